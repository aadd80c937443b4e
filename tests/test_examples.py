"""The user examples of examples/, tiny and offline: train_teacher.py then train_distill.py (the
shared recipe), evaluate.py and extract_features.py. research/ has its own tests
(tests/test_research.py)."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch

from sureid import SureidModel, SureidStudentConfig, SureidStudentModel, SureidTeacherModel

from .conftest import TINY

# Tiny models gain nothing from intra-op threads; on a busy machine they cost several times more.
pytestmark = pytest.mark.usefixtures("one_thread")

TINY_ARGS = [
    "--from-scratch", "--hidden-size", "32", "--depth", "4", "--heads", "2",
    "--image-size", "64", "32", "--patch-size", "8", "--max-steps", "2",
    "--batch-size", "8", "--num-instances", "2", "--dataloader-num-workers", "0",
]  # fmt: skip


def _run(script: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(script, run_name="__main__")


@pytest.mark.slow
def test_teacher_then_student_through_the_examples(tmp_path, monkeypatch, capsys):
    data = tmp_path / "synthetic"
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    common = ["--dataset", "synthetic", "--data-root", str(data), *TINY_ARGS]
    _run("examples/train_teacher.py", [*common, "--output-dir", str(teacher_dir)], monkeypatch)
    assert isinstance(SureidModel.from_pretrained(teacher_dir), SureidTeacherModel)
    _run(
        "examples/train_distill.py",
        [*common, "--output-dir", str(student_dir), "--teacher", str(teacher_dir),
         "--sparsify-layers", "1", "2", "3"],
        monkeypatch,
    )  # fmt: skip
    student = SureidModel.from_pretrained(student_dir)
    assert isinstance(student, SureidStudentModel) and student.config.keep_rate == 0.7
    out = capsys.readouterr().out
    assert "teacher on synthetic: R1" in out and "student on synthetic: R1" in out


def test_evaluate_and_extract_features_on_a_tiny_student(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """examples/evaluate.py prints and writes the benchmark's numbers; extract_features.py
    saves a gallery of a folder's crops, then finds a crop of it first for itself."""
    torch.manual_seed(0)
    model_dir = tmp_path / "student"
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), num_identities=4)
    SureidStudentModel(config).eval().save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--device", "cpu"]
    numbers = tmp_path / "metrics.json"
    _run(
        "examples/evaluate.py",
        [*common, "--dataset", "synthetic", "--root", str(tiny_synthetic_root),
         "--json", str(numbers)],
        monkeypatch,
    )  # fmt: skip
    written = json.loads(numbers.read_text())
    assert f"{100 * written['mAP']:.1f}" in capsys.readouterr().out

    crops = sorted((tiny_synthetic_root / "query").glob("*.jpg"))
    gallery = tmp_path / "gallery"
    _run(
        "examples/extract_features.py",
        [*common, "--images", str(tiny_synthetic_root / "query"), "--out", str(gallery)],
        monkeypatch,
    )
    assert f"{len(crops)} crops -> {gallery}" in capsys.readouterr().out
    _run(
        "examples/extract_features.py",
        [*common, "--out", str(gallery), "--query", str(crops[0]), "--top-k", "1"],
        monkeypatch,
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(crops[0]) and lines[1].endswith(f"  {crops[0]}")
