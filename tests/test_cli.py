"""The ``sureid`` console script: version, the demo's smoke run, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sureid import __version__
from sureid.cli import main


def test_version_matches_the_package():
    done = subprocess.run(
        [sys.executable, "-m", "sureid.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == f"sureid {__version__}"


def test_demo_quick_runs_every_step(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "| model | keep |"):
        assert step in printed
    report = (out / "report.md").read_text()
    for row in ("dense", "+ HTS |", "+ HTS + NPKD |", "+ HTS + NPKD + NODA (SUREID)", "teacher"):
        assert row in report
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 5
    assert all(0.0 <= r["rank1"] <= 1.0 and r["images_per_second"] > 0 for r in rows)
    # 32 tokens at 64x32 / patch 8; p = 0.7 keeps 22, 16, 11
    assert [r["tokens_last_stage"] for r in rows] == [32, 11, 11, 11, 32]
    assert (out / "kept_tokens.png").stat().st_size > 0
    assert (out / "hts_npkd_noda" / "model.safetensors").is_file()


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(["no-such-command"])
    assert (
        main(["convert", "--timm-name", "nope_model", "--checkpoint", "missing.pth", "--out", "x"])
        == 2
    )
    assert "nope_model" in capsys.readouterr().err
