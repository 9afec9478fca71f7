"""The two-moons illustration runs, writes a PNG, and CIW really down-weights flipped labels."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from cicw.examples import two_moons
from service.cli import main as cli_main


def test_two_moons_writes_figure_and_downweights_flipped_labels(tmp_path: Path) -> None:
    out = tmp_path / "moons.png"
    summary = two_moons.run(out=str(out), seed=1, steps=800, n=400)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 300
    assert summary["ciw_mean_weight_flipped"] < 0.5 * summary["ciw_mean_weight_clean"]
    assert summary["ciw_test_accuracy"] > 0.8


def test_cli_moons_subcommand(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli.png"
    assert cli_main(["moons", "--out", str(out), "--seed", "2"]) == 0
    assert out.exists() and "CIW test accuracy" in capsys.readouterr().out
