"""The service validates job specs and reads reports without loading torch, Ray or a Kafka client."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "confluent_kafka", "kafka")


def test_spec_report_and_errors_import_without_heavy_packages() -> None:
    code = ("import sys, workers.spec, workers.report, workers.errors; "
            "spec = workers.spec.JobSpec.model_validate({'job_id': 'j', "
            "'source': {'bootstrap_servers': 'b:9092', 'topic': 't'}, "
            "'codec': {'input_shape': [4], 'num_classes': 2, 'format': {'kind': 'json'}}}); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the spec loaded {out.stdout.strip()}"
