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


def test_demo_seeds_prints_each_run_and_the_mean_by_hand(tmp_path, monkeypatch, capsys):
    import json
    from dataclasses import asdict

    from sureid.demo import DemoRow

    def rows(r1_dense, r1_hts, spearman):
        check = dict.fromkeys(
            ("predictor_R1", "predictor_mAP", "random_R1", "random_mAP", "guide_R1", "guide_mAP"),
            0.5,
        )
        check.update(spearman=spearman, body_share=0.3, guide_body_share=None, body_chance=0.2)
        return [
            DemoRow("dense", 1.0, 128, r1_dense, 0.5, 100.0, 10.0, 30.0),
            DemoRow("+ HTS", 0.7, 44, r1_hts, 0.4, 150.0, 7.0, 40.0, check=check),
        ]

    folders = []
    for i, run in enumerate((rows(0.6, 0.5, 0.2), rows(0.7, 0.3, -0.4))):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps([asdict(r) for r in run]))
        folders.append(str(folder))
    _run("examples/demo_seeds.py", ["--read", *folders], monkeypatch)
    out = capsys.readouterr().out
    mean = out.split("mean over 2 runs")[1]
    # R1 (60 + 70) / 2 = 65.0 and (50 + 30) / 2 = 40.0; img/s 150 / 100 = 1.50x; Spearman -0.10
    assert "| dense | 1 | 128 | 65.0 | 50.0 | 100 | 1.00x | 30 |" in mean
    assert "| + HTS | 0.7 | 44 | 40.0 | 40.0 | 150 | 1.50x | 40 |" in mean
    assert "| -0.10 / - | 30% / - (20%) | - |" in mean
