"""docs/job-spec.md is generated from the models and must match them."""

from __future__ import annotations

from pathlib import Path

from workers.spec_reference import reference


def test_job_spec_reference_is_up_to_date() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "job-spec.md"
    assert doc.read_text() == reference(), "regenerate: python -m workers.spec_reference > docs/job-spec.md"


def test_reference_covers_every_section_with_defaults() -> None:
    text = reference()
    for section in ("JobSpec", "SourceSpec", "CodecSpec", "RawFormat", "ImageFormat", "EvaluationSpec",
                    "CheckpointSpec", "CICWConfig", "ScalingSpec", "OptimizerSpec", "ModelSpec"):
        assert f"\n## {section}\n" in text
    assert "| `stall_deadline_s` | `float \\| None` | `300.0` |" in text
    assert "| `job_id` | `str` | **required** |" in text
