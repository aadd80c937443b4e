"""examples/train_teacher.py then examples/train_distill.py (the shared recipe), tiny and offline."""

from __future__ import annotations

import runpy
import sys

from sureid import SureidModel, SureidStudentModel, SureidTeacherModel

TINY_ARGS = [
    "--from-scratch", "--hidden-size", "32", "--depth", "4", "--heads", "2",
    "--image-size", "64", "32", "--patch-size", "8", "--max-steps", "2",
    "--batch-size", "8", "--num-instances", "2", "--workers", "0",
]  # fmt: skip


def _run(script: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(script, run_name="__main__")


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
