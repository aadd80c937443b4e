"""The ``sureid`` console script: version, the main job's comparison, argument errors."""

from __future__ import annotations

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


def test_demo_compares_dense_and_student(capsys):
    code = main(
        ["demo", "--hidden-size", "64", "--batch-size", "2", "--repeats", "1", "--keep-rate", "0.5"]
    )
    out = capsys.readouterr().out
    assert code == 0
    # 128 tokens at 256x128; p = 0.5 keeps 64, 32, 16
    for kept in ("keeps  64 / 128", "keeps  32 / 128", "keeps  16 / 128"):
        assert kept in out
    assert "dense (keep 1.0)" in out and "student (keep 0.5)" in out and "speed-up" in out


def test_bad_arguments_exit_with_a_message(capsys):
    assert main(["demo", "--keep-rate", "1.5", "--hidden-size", "64"]) == 2
    assert "keep_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no-such-command"])
