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


def _examples(*names: str) -> list:
    """The named modules of examples/ (not a package), imported with it on the path."""
    import importlib

    sys.path.insert(0, "examples")
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove("examples")


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


def test_attention_probe_agrees_with_the_predictor_check(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """examples/attention_probe.py on a demo-like folder of tiny models: its Spearman (vs the
    teacher's rollout) and body AUC of an HTS student are the predictor check's."""
    import re
    import shutil
    from types import SimpleNamespace

    import pytest
    import torch

    from sureid import (
        SureidStudentConfig,
        SureidTeacherConfig,
        SureidTeacherModel,
        check_token_selection,
    )
    from sureid.data import load_reid_dataset

    from .conftest import TINY

    (attention_probe,) = _examples("attention_probe")
    border_ring, patch_pixel_std = attention_probe.border_ring, attention_probe.patch_pixel_std
    # The outer ring of a 4 x 3 grid: everything but the two middle patches (4 and 7).
    assert border_ring((4, 3)).tolist() == [True] * 4 + [False] + [True] * 2 + [False] + [True] * 4
    # Pixel std per patch, patches cut as the embedding cuts them: a 4 x 2 image in 2 x 2
    # patches, one channel; the top patch is flat, the bottom one (0, 2, 0, 2): std 2/sqrt(3).
    grid = SimpleNamespace(patch_size=2, stride_size=2, num_patches=2)
    pixels = torch.tensor([[[[5.0, 5], [5, 5], [0, 2], [0, 2]]]])
    assert patch_pixel_std(pixels, grid)[0].tolist() == pytest.approx([0.0, 2 / 3**0.5])
    with pytest.raises(ValueError, match="model's image size"):
        patch_pixel_std(pixels[..., :2, :], grid)

    folder = tmp_path / "demo"
    shutil.copytree(tiny_synthetic_root, folder / "data")
    torch.manual_seed(0)
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY)).eval()
    dense = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3), keep_rate=1.0))
    dense.eval()
    hts = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))).eval()
    for name, model in (("teacher", teacher), ("dense", dense), ("hts", hts)):
        model.save_pretrained(folder / name)
    _run("examples/attention_probe.py", [str(folder)], monkeypatch)
    out = capsys.readouterr().out
    for model in ("teacher", "dense"):
        for method in ("rollout", "cls-attention", "attention-norm"):
            assert re.search(rf"\| {model} \| {method} \| \d\.\d\d \| \d+% \(\d+%\) \|", out)
        # where the norms come from: 3 ratios, 3 Spearmans, the background-only Spearman
        number = r"[-+]\d\.\d\d"
        assert re.search(
            rf"\| {model} \| (\d+\.\d\d \| ){{3}}{number} / {number} / {number} \| {number} \|",
            out,
        ), out
    data = load_reid_dataset("synthetic", folder / "data")
    check = check_token_selection(hts, data["query"], data["gallery"], teacher, device="cpu")
    row = re.search(
        r"\| hts \| ([-+]\d\.\d\d) \| ([-+]\d\.\d\d) \| ([-+]\d\.\d\d) \| (\d\.\d\d) \|", out
    )
    assert row is not None, out
    assert float(row[1]) == pytest.approx(check.spearman, abs=0.006)
    assert float(row[3]) == pytest.approx(check.other_spearman["attention-norm"], abs=0.006)
    assert float(row[4]) == pytest.approx(check.body_auc, abs=0.006)


def test_register_probe_prints_each_models_measures(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """examples/register_probe.py: one row per pretrained model (here a tiny stand-in for
    pretrain_dense_model), with the numbers of its own ``measure``."""
    import re
    import shutil

    import torch

    from sureid import SureidTeacherConfig, SureidTeacherModel
    from sureid.data import load_reid_dataset

    from .conftest import TINY

    (register_probe,) = _examples("register_probe")
    folder = tmp_path / "demo"
    shutil.copytree(tiny_synthetic_root, folder / "data")
    made = []

    def tiny_pretraining(*, steps, work_dir, num_prefix_tokens, log):
        torch.manual_seed(steps)
        made.append(
            SureidTeacherModel(
                SureidTeacherConfig(**TINY, num_prefix_tokens=num_prefix_tokens)
            ).eval()
        )
        return made[-1], 1.0

    monkeypatch.setattr(register_probe, "pretrain_dense_model", tiny_pretraining)
    register_probe.main([str(folder), "--steps", "3", "--prefix-tokens", "1", "2", "--keep", "10"])
    out = capsys.readouterr().out
    query = load_reid_dataset("synthetic", folder / "data")["query"]
    for prefix, model in zip((1, 2), made):
        m = register_probe.measure(model, query, 10)
        row = re.search(rf"\| pretrained here \(3 steps\) \| {prefix} \| (.*) \|", out)
        assert row is not None, out
        assert row[1].startswith(f"{m['auc']['rollout']:.2f} / {m['auc']['cls-attention']:.2f}")
        assert f"| {m['norm_ratio']:.2f} |" in row[0]


def test_npkd_probe_splits_the_feature_term_and_measures_the_students(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """examples/npkd_probe.py: the feature term's split by hand, CKA's invariances, and one row
    per student of a demo-like folder whose numbers are the probe's own on those models."""
    import re
    import shutil

    import pytest
    import torch

    from sureid import SureidStudentConfig, SureidTeacherConfig, SureidTeacherModel
    from sureid.data import load_reid_dataset

    from .conftest import TINY

    (npkd_probe,) = _examples("npkd_probe")
    # Two images, two channels. Means: student (1, 1), teacher (0, 2): offset (1 + 1) / 2 = 1.
    # Deviations: student (+-1, 0), teacher (0, +-1): per image (1 + 1) / 2 = 1. Total 2.
    f_s, f_t = torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    assert npkd_probe.feature_term_split(f_s, f_t) == pytest.approx((2.0, 1.0, 1.0))
    assert npkd_probe.spread(f_s) == pytest.approx(1.0)
    a = torch.randn(32, 6)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    assert npkd_probe.linear_cka(a, 3.0 * a @ rotation + 5.0) == pytest.approx(1.0, abs=1e-5)
    assert npkd_probe.linear_cka(a, torch.randn(32, 4)) < 0.9

    folder = tmp_path / "demo"
    shutil.copytree(tiny_synthetic_root, folder / "data")
    ids = len(set(load_reid_dataset("synthetic", folder / "data")["train"]["pid"]))
    torch.manual_seed(0)
    wide = {**TINY, "hidden_size": 128}  # twice the students' width, as in the demo
    teacher = SureidTeacherModel(SureidTeacherConfig(**wide, num_identities=ids)).eval()
    students = {
        "dense": SureidStudentModel(
            SureidStudentConfig(**TINY, sparsify_layers=(1, 3), keep_rate=1.0, num_identities=ids)
        ),
        "hts": SureidStudentModel(
            SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), num_identities=ids)
        ),
    }
    teacher.save_pretrained(folder / "teacher")
    for name, model in students.items():
        model.eval().save_pretrained(folder / name)
    npkd_probe.main([str(folder), "--images", "8"])
    out = capsys.readouterr().out
    train = load_reid_dataset("synthetic", folder / "data")["train"]
    images = train.select(range(0, len(train), max(1, len(train) // 8)))
    f_t, logits_t = npkd_probe.features_and_logits(teacher, images)
    for name, model in students.items():
        m = npkd_probe.probe(model, f_t, logits_t, images)
        assert m["feature term"] == pytest.approx(m["offset"] + m["per-image"], rel=1e-4)
        row = re.search(rf"\| {name} \| (\d+\.\d+) \| (\d+\.\d+) \| (\d+\.\d+) \|", out)
        assert row is not None, out
        assert float(row[1]) == pytest.approx(m["feature term"], abs=1e-4)
        assert float(row[2]) == pytest.approx(m["offset"], abs=1e-4)
        sharp = rf"{100 * m['top-1']:.1f}% / {100 * m['top p']:.1f}%"
        assert re.search(rf"\| {name} \|.*\| {m['CKA']:.3f} \| {m['KL']:.3f} \| {sharp} \|", out)
    assert re.search(r"teacher: identity ranked first on \d+\.\d% of them", out), out
    # identity 0 ranked first (right), identity 1 ranked second (wrong): top-1 1/2; the top
    # probabilities are e^2 / (e^2 + 1) and e / (e + 1)
    logits, labels = torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    e = torch.e
    expected = (0.5, (e**2 / (e**2 + 1) + e / (e + 1)) / 2)
    assert npkd_probe.classifier_sharpness(logits, labels) == pytest.approx(expected)


def test_demo_ablation_table_shows_the_occluder_measures_when_the_check_has_them():
    """examples/demo_ablation.py: a row's occluder share, its two ranking R1s and how much of
    the top-k the training sampling keeps, '-' where the check had none of them, and the mean
    over seeds by hand."""
    (demo_ablation,) = _examples("demo_ablation")
    check = {
        "random_R1": 0.5,
        "guide_R1": 0.55,
        "spearman": -0.2,
        "spearman_attention_norm": 0.3,
        "body_share": 0.36,
        "body_chance": 0.18,
        "body_auc": 0.8,
        "guide_body_auc": 0.6,
        "occluder_share": 0.22,
        "occluder_chance": 0.18,
        "stage1_ranking_R1": 0.617,
        "occluder_dropped_R1": 0.727,
        "sampling_overlap": 0.45,
        "sampling_overlap_chance": 0.34,
    }
    older = {
        k: v
        for k, v in check.items()
        if "occluder" not in k and "stage1" not in k and "sampling" not in k
    }
    rows = [
        ("teacher", "-", 0.7, 0.65, None),
        ("paper", "+ HTS", 0.633, 0.559, check),
        ("paper", "+ HTS", 0.633, 0.559, older),
    ]
    lines = demo_ablation.format_rows(rows)
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 13
    assert lines[3].endswith("| 0.80 / 0.60 | 22% (18%) | 61.7 / 72.7 | 45% (34%) |")
    assert lines[4].endswith("| 0.80 / 0.60 | - | - | - |")
    mean = demo_ablation.mean_rows([[rows[1]], [("paper", "+ HTS", 0.5, 0.4, check)]])
    assert mean[0][2] == (0.633 + 0.5) / 2 and mean[0][4]["occluder_dropped_R1"] == 0.727


def test_finetune_attention_probe_trains_each_variant_once_and_prints_its_measures(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """examples/finetune_attention_probe.py: each variant's settings and the backbone reach the
    training, each row holds that model's own R1 / mAP, attention measures and Spearman (the
    predictor check's, with this model as the teacher), a second run measures the saved models
    again instead of training them, and a saved model of another recipe is refused."""
    import shutil
    from types import SimpleNamespace

    import pytest
    import torch

    from sureid import (
        SureidStudentConfig,
        SureidTeacherConfig,
        SureidTeacherModel,
        check_token_selection,
    )
    from sureid.data import load_reid_dataset

    from .conftest import TINY

    demo_ablation, probe, register_probe = _examples(
        "demo_ablation", "finetune_attention_probe", "register_probe"
    )
    folder = tmp_path / "demo"
    shutil.copytree(tiny_synthetic_root, folder / "data")
    data = load_reid_dataset("synthetic", folder / "data")
    torch.manual_seed(0)
    hts = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))).eval()
    hts.save_pretrained(tmp_path / "students" / "hts")
    trained = []

    def tiny_training(key, s, data, work, *, pretrained, log):
        assert key == "dense" and pretrained is not None and "tensors" in pretrained
        trained.append(s)
        torch.manual_seed(len(trained))
        ids = len(set(data["train"]["pid"]))
        model = SureidTeacherModel(SureidTeacherConfig(**TINY, num_identities=ids)).eval()
        model.save_pretrained(work / "dense")
        return SimpleNamespace(model=model)

    monkeypatch.setattr(probe, "train_student", tiny_training)
    monkeypatch.setattr(
        probe,
        "backbone_model",
        lambda settings, role: SureidTeacherModel(SureidTeacherConfig(**TINY)),
    )
    argv = [str(folder), "--work-dir", str(tmp_path / "work"), "--keep", "10"]
    argv += ["--students", str(tmp_path / "students")]
    variants = ["--variant", "paper:", "--variant", "plain:random_patch=0.0,random_erasing=0.0"]
    probe.main(argv + variants)
    assert [(s.random_patch, s.random_erasing) for s in trained] == [(0.5, 0.5), (0.0, 0.0)]
    out = capsys.readouterr().out
    assert "| backbone | - |" in out and "keep score with its rollout (hts) |" in out
    rows = {}
    for name in ("paper", "plain"):
        saved = tmp_path / "work" / "seed0" / "student" / name / "dense"
        model = SureidModel.from_pretrained(saved).eval()
        m = register_probe.measure(model, data["query"], 10)
        r1, m_ap = demo_ablation.evaluate(model, data)
        rows[name] = (
            f"| {name} | {100 * r1:.1f} / {100 * m_ap:.1f} | {m['auc']['rollout']:.2f} / "
            f"{m['auc']['cls-attention']:.2f} / {m['auc']['attention-norm']:.2f} | "
            f"{100 * m['top']['rollout']:.0f}% ({100 * m['chance']:.0f}%) | "
            f"{m['norm_ratio']:.2f} | "
        )
        line = next(line for line in out.splitlines() if line.startswith(rows[name]))
        rho = float(line[len(rows[name]) :].strip(" |"))
        check = check_token_selection(hts, data["query"], data["gallery"], model, device="cpu")
        assert rho == pytest.approx(check.spearman, abs=0.006)
    probe.main(argv + variants)
    assert len(trained) == 2  # the saved models were measured again, not trained
    again = capsys.readouterr().out
    assert [line for line in again.splitlines() if line.startswith(("| paper", "| plain"))] == [
        line for line in out.splitlines() if line.startswith(("| paper", "| plain"))
    ]
    with pytest.raises(SystemExit, match="another recipe"):
        probe.main(argv + ["--variant", "plain:random_patch=0.0"])
    with pytest.raises(SystemExit, match="teacher_noda.*do not change the student"):
        probe.main(argv + ["--variant", "nonoda:teacher_noda=False"])
    with pytest.raises(SystemExit, match="holds none of hts"):
        probe.main(argv[:-1] + [str(tmp_path / "work"), "--variant", "paper:"])
    assert len(trained) == 2
