"""The research studies of research/ (``python -m research.<study>``): their measures by hand
(fast), and one smoke run of each at tiny sizes (slow tier: ``sureid.demo.quick_settings`` or
tiny models in a demo-like folder). Tests run from the repository root, so ``research`` imports
as a package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from research import (
    adaptive_budget,
    attention_probe,
    demo_ablation,
    demo_seeds,
    finetune_attention_probe,
    hts_probe,
    npkd_probe,
    register_probe,
)
from sureid import (
    SureidModel,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.analysis import check_token_selection
from sureid.data import load_reid_dataset
from sureid.demo import DEMO_TRAINING, DemoSettings, quick_settings

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# Tiny models gain nothing from intra-op threads; on a busy machine they cost several times more.
pytestmark = pytest.mark.usefixtures("one_thread")


def _demo_folder(tiny_synthetic_root, tmp_path) -> Path:
    """A folder laid out as a finished demo's, with the tiny synthetic set as its data."""
    folder = tmp_path / "demo"
    shutil.copytree(tiny_synthetic_root, folder / "data")
    return folder


# -- every study runs as a module from the repository root --------------------------------------


@pytest.mark.slow
def test_a_study_runs_as_a_module_from_the_repository_root():
    done = subprocess.run(
        [sys.executable, "-m", "research.demo_ablation", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--variant" in done.stdout and "--quick" in done.stdout


# -- demo_ablation --------------------------------------------------------------------------


def test_demo_ablation_variants_override_settings_and_training_keys():
    name, overrides = demo_ablation.parse_variant(
        "lr:training.learning_rate=1e-3,hts_epochs=4,hts_sampling=gumbel-topk"
    )
    assert name == "lr"
    assert overrides == {
        "training.learning_rate": 1e-3,
        "hts_epochs": 4,
        "hts_sampling": "gumbel-topk",  # not a literal: kept as a string
    }
    base = DemoSettings()
    s = demo_ablation.apply_overrides(base, overrides)
    assert s.hts_epochs == 4 and s.hts_sampling == "gumbel-topk"
    assert s.training == {**DEMO_TRAINING, "learning_rate": 1e-3}
    assert base.training == DEMO_TRAINING  # the base settings' dict is not touched
    assert demo_ablation.parse_variant("paper:") == ("paper", {})
    none = demo_ablation.parse_variant("x:training.predictor_learning_rate=None")[1]
    assert demo_ablation.apply_overrides(base, none).training["predictor_learning_rate"] is None


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("x:bogus=1", "'bogus': not a DemoSettings field"),
        ("x:training.bogus=1", "'training.bogus': not a SureidTrainingArguments field"),
        ("x:learning_rate=1e-3", "'learning_rate': now training.learning_rate"),
        ("x:hts_topk_epochs=2", "'hts_topk_epochs': a retired option.*8907d49"),
        ("x:training.lambda_occlusion=1.0", "'training.lambda_occlusion': a retired option"),
    ],
)
def test_demo_ablation_refuses_unknown_and_retired_fields(variant, message):
    with pytest.raises(SystemExit, match=f"variant 'x': {message}"):
        demo_ablation.parse_variant(variant)


def test_demo_ablation_table_shows_the_occluder_measures_when_the_check_has_them():
    """A row's occluder share, its two ranking R1s and how much of the top-k the training
    sampling keeps, '-' where the check had none of them, and the mean over seeds by hand."""
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


@pytest.mark.slow
def test_demo_ablation_smoke_run_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    """--quick: each variant's overrides (a training key among them) reach the rows' training;
    the HTS row is checked; --reuse checks the saved rows again without training them."""
    trained = []

    def spy(key, s, *args, **kwargs):
        trained.append((key, kwargs.get("name"), s.training["learning_rate"], s.hts_epochs))
        return demo_ablation_train(key, s, *args, **kwargs)

    demo_ablation_train = demo_ablation.train_student
    monkeypatch.setattr(demo_ablation, "train_student", spy)
    out = tmp_path / "ablation"
    argv = ["--quick", "--out", str(out), "--seeds", "0", "--rows", "hts", "--base", "depth=4"]
    demo_ablation.main(argv + ["--variant", "lr:training.learning_rate=1e-3,hts_epochs=2"])
    lr = DEMO_TRAINING["learning_rate"]
    assert trained == [("dense", "dense_start", lr, 1), ("hts", None, 1e-3, 2)]
    text = capsys.readouterr().out
    assert "| teacher | - |" in text and "| dense start | - |" in text
    row = re.search(r"\| lr \| \+ HTS \| (\d+\.\d) \| (\d+\.\d) \| (\d+\.\d) \|", text)
    assert row is not None, text
    assert (out / "results.json").is_file() and (out / "seed0" / "lr" / "hts").is_dir()
    demo_ablation.main(argv + ["--reuse", "--variant", "lr:"])
    assert len(trained) == 2  # the dense start, the teacher and the row were reused
    assert f"| lr | + HTS | {row[1]} | {row[2]} | {row[3]} |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--base cannot set seed"):
        demo_ablation.main(["--quick", "--out", str(out), "--base", "seed=3"])


# -- demo_seeds -----------------------------------------------------------------------------


def _demo_rows(r1_dense, r1_hts, spearman):
    from sureid.demo import DemoRow

    check = dict.fromkeys(
        ("predictor_R1", "predictor_mAP", "random_R1", "random_mAP", "guide_R1", "guide_mAP"),
        0.5,
    )
    check.update(spearman=spearman, body_share=0.3, guide_body_share=None, body_chance=0.2)
    return [
        DemoRow("dense", 1.0, 128, r1_dense, 0.5, 100.0, 10.0, 30.0),
        DemoRow("+ HTS", 0.7, 44, r1_hts, 0.4, 150.0, 7.0, 40.0, check=check),
    ]


def test_demo_seeds_prints_each_run_and_the_mean_by_hand(tmp_path, capsys):
    import json
    from dataclasses import asdict

    folders = []
    for i, run in enumerate((_demo_rows(0.6, 0.5, 0.2), _demo_rows(0.7, 0.3, -0.4))):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps([asdict(r) for r in run]))
        folders.append(str(folder))
    demo_seeds.main(["--read", *folders])
    out = capsys.readouterr().out
    mean = out.split("mean over 2 runs")[1]
    # R1 (60 + 70) / 2 = 65.0 and (50 + 30) / 2 = 40.0; img/s 150 / 100 = 1.50x; Spearman -0.10
    assert "| dense | 1 | 128 | 65.0 | 50.0 | 100 | 1.00x | 30 |" in mean
    assert "| + HTS | 0.7 | 44 | 40.0 | 40.0 | 150 | 1.50x | 40 |" in mean
    assert "| -0.10 / - | 30% / - (20%) | - |" in mean
    with pytest.raises(SystemExit, match="run `sureid demo --out"):
        demo_seeds.main(["--read", str(tmp_path)])


@pytest.mark.slow
def test_demo_seeds_smoke_run_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    """--quick runs the demo per seed (here with two rows), then reads the folder again."""
    monkeypatch.setattr(
        demo_seeds, "quick_settings", partial(quick_settings, rows=("dense", "hts"))
    )
    out = tmp_path / "seeds"
    demo_seeds.main(["--quick", "--seeds", "0", "--out", str(out)])
    assert (out / "seed0" / "results.json").is_file()
    first = capsys.readouterr().out.split("mean over 1 runs")[1]
    assert "| + HTS | 0.7 |" in first
    demo_seeds.main(["--quick", "--seeds", "0", "--out", str(out)])  # read, not run again
    assert capsys.readouterr().out.split("mean over 1 runs")[1] == first


# -- attention_probe ------------------------------------------------------------------------


def test_attention_probe_ring_and_patch_flatness_by_hand():
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


@pytest.mark.slow
def test_attention_probe_agrees_with_the_predictor_check(tiny_synthetic_root, tmp_path, capsys):
    """On a demo-like folder of tiny models: its Spearman (vs the teacher's rollout) and body
    AUC of an HTS student are the predictor check's."""
    folder = _demo_folder(tiny_synthetic_root, tmp_path)
    torch.manual_seed(0)
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY)).eval()
    dense = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3), keep_rate=1.0))
    dense.eval()
    hts = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))).eval()
    for name, model in (("teacher", teacher), ("dense", dense), ("hts", hts)):
        model.save_pretrained(folder / name)
    attention_probe.main([str(folder)])
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


# -- register_probe -------------------------------------------------------------------------


@pytest.mark.slow
def test_register_probe_smoke_run_prints_each_models_measures(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """--quick: one tiny model pretrained per prefix-token count, one row each with the
    numbers of its own ``measure``."""
    from sureid import demo

    made = []

    def spy(**kwargs):
        assert kwargs["num_ids"] == 8 and kwargs["settings"].student_hidden == 32
        made.append(demo.pretrain_dense_model(**kwargs))
        return made[-1]

    monkeypatch.setattr(register_probe, "pretrain_dense_model", spy)
    folder = _demo_folder(tiny_synthetic_root, tmp_path)
    argv = [str(folder), "--quick", "--steps", "2", "--prefix-tokens", "1", "2", "--keep", "10"]
    register_probe.main(argv + ["--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    query = load_reid_dataset("synthetic", folder / "data")["query"]
    assert [model.config.num_prefix_tokens for model, _ in made] == [1, 2]
    for prefix, (model, _) in zip((1, 2), made):
        m = register_probe.measure(model, query, 10)
        row = re.search(rf"\| pretrained here \(2 steps\) \| {prefix} \| (.*) \|", out)
        assert row is not None, out
        assert row[1].startswith(f"{m['auc']['rollout']:.2f} / {m['auc']['cls-attention']:.2f}")
        assert f"| {m['norm_ratio']:.2f} |" in row[0]


# -- npkd_probe -----------------------------------------------------------------------------


def test_npkd_probe_splits_the_feature_term_by_hand():
    # Two images, two channels. Means: student (1, 1), teacher (0, 2): offset (1 + 1) / 2 = 1.
    # Deviations: student (+-1, 0), teacher (0, +-1): per image (1 + 1) / 2 = 1. Total 2.
    f_s, f_t = torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    assert npkd_probe.feature_term_split(f_s, f_t) == pytest.approx((2.0, 1.0, 1.0))
    assert npkd_probe.spread(f_s) == pytest.approx(1.0)
    torch.manual_seed(0)
    a = torch.randn(32, 6)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    assert npkd_probe.linear_cka(a, 3.0 * a @ rotation + 5.0) == pytest.approx(1.0, abs=1e-5)
    assert npkd_probe.linear_cka(a, torch.randn(32, 4)) < 0.9
    # identity 0 ranked first (right), identity 1 ranked second (wrong): top-1 1/2; the top
    # probabilities are e^2 / (e^2 + 1) and e / (e + 1)
    logits, labels = torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    e = torch.e
    expected = (0.5, (e**2 / (e**2 + 1) + e / (e + 1)) / 2)
    assert npkd_probe.classifier_sharpness(logits, labels) == pytest.approx(expected)


@pytest.mark.slow
def test_npkd_probe_measures_the_students_of_a_demo_folder(tiny_synthetic_root, tmp_path, capsys):
    """One row per student of a demo-like folder, whose numbers are the probe's own on those
    models."""
    folder = _demo_folder(tiny_synthetic_root, tmp_path)
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


# -- finetune_attention_probe ---------------------------------------------------------------


@pytest.mark.slow
def test_finetune_attention_probe_trains_each_variant_once_and_prints_its_measures(
    tiny_synthetic_root, tmp_path, monkeypatch, capsys
):
    """--quick: each variant's overrides reach the training, each row holds that model's own
    R1 / mAP, attention measures and Spearman (the predictor check's, with this model as the
    teacher), a second run measures the saved models again instead of training them, and a
    saved model of another recipe is refused."""
    probe = finetune_attention_probe
    folder = _demo_folder(tiny_synthetic_root, tmp_path)
    data = load_reid_dataset("synthetic", folder / "data")
    torch.manual_seed(0)
    hts = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))).eval()
    hts.save_pretrained(tmp_path / "students" / "hts")
    trained = []

    def spy(key, s, *args, **kwargs):
        assert key == "dense" and s.student_hidden == 32  # quick_settings' sizes
        trained.append(s)
        return train_student(key, s, *args, **kwargs)

    train_student = probe.train_student
    monkeypatch.setattr(probe, "train_student", spy)
    # a backbone to measure (quick_settings has none): a tiny dense model
    monkeypatch.setattr(
        probe, "load_pretrained", lambda s, role, log=print: (None, Path("tiny-backbone"))
    )
    monkeypatch.setattr(
        probe,
        "backbone_model",
        lambda path, settings, role: SureidTeacherModel(SureidTeacherConfig(**TINY)).eval(),
    )
    argv = [str(folder), "--quick", "--work-dir", str(tmp_path / "work"), "--keep", "10"]
    argv += ["--students", str(tmp_path / "students")]
    plain = "plain:training.random_patch=0.0,training.random_erasing=0.0"
    variants = ["--variant", "paper:", "--variant", plain]
    probe.main(argv + variants)
    assert [s.training.get("random_patch") for s in trained] == [None, 0.0]
    assert [s.training.get("random_erasing") for s in trained] == [None, 0.0]
    out = capsys.readouterr().out
    assert "| backbone | - |" in out and "keep score with its rollout (hts) |" in out
    for name in ("paper", "plain"):
        saved = tmp_path / "work" / "seed0" / "student" / name / "dense"
        model = SureidModel.from_pretrained(saved).eval()
        m = register_probe.measure(model, data["query"], 10)
        r1, m_ap = demo_ablation.evaluate(model, data)
        start = (
            f"| {name} | {100 * r1:.1f} / {100 * m_ap:.1f} | {m['auc']['rollout']:.2f} / "
            f"{m['auc']['cls-attention']:.2f} / {m['auc']['attention-norm']:.2f} | "
            f"{100 * m['top']['rollout']:.0f}% ({100 * m['chance']:.0f}%) | "
            f"{m['norm_ratio']:.2f} | "
        )
        line = next(line for line in out.splitlines() if line.startswith(start))
        rho = float(line[len(start) :].strip(" |"))
        check = check_token_selection(hts, data["query"], data["gallery"], model, device="cpu")
        assert rho == pytest.approx(check.spearman, abs=0.006)
    probe.main(argv + variants)
    assert len(trained) == 2  # the saved models were measured again, not trained
    again = capsys.readouterr().out
    assert [line for line in again.splitlines() if line.startswith(("| paper", "| plain"))] == [
        line for line in out.splitlines() if line.startswith(("| paper", "| plain"))
    ]
    with pytest.raises(SystemExit, match="another recipe"):
        probe.main(argv + ["--variant", "plain:training.random_patch=0.0"])
    with pytest.raises(SystemExit, match="teacher_noda.*do not change the student"):
        probe.main(argv + ["--variant", "nonoda:teacher_noda=False"])
    with pytest.raises(SystemExit, match="holds none of hts"):
        probe.main(argv[:-1] + [str(tmp_path / "work"), "--variant", "paper:"])
    with pytest.raises(SystemExit, match="'random_patch': now training.random_patch"):
        probe.main(argv + ["--variant", "plain:random_patch=0.0"])
    assert len(trained) == 2


# -- hts_probe ------------------------------------------------------------------------------


@pytest.mark.slow
def test_hts_probe_smoke_run_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    """--quick, two of its variants: fresh predictors on the frozen dense student, one table
    row each with the pushes of CE / triplet / ratio and the check's numbers; the backbone
    stays frozen."""
    chosen = ("ratio alone, start 0.5, one stage", "CE + triplet, Gumbel-top-k")
    monkeypatch.setattr(hts_probe, "VARIANTS", {k: hts_probe.VARIANTS[k] for k in chosen})
    out = tmp_path / "hts-probe"
    hts_probe.main(["--quick", "--out", str(out), "--steps", "2"])
    text = capsys.readouterr().out
    dense = SureidStudentModel.from_pretrained(out / "dense")
    assert "2 predictor steps on the frozen dense student" in text
    number = r"[-+]\d\.\d\d"
    one_stage = re.search(
        rf"\| {re.escape(chosen[0])} \| ({number}) / ({number}) / ({number}) \|", text
    )
    assert one_stage is not None, text
    # Gumbel-top-k keeps exactly k tokens: the ratio loss does not reach the keep logits
    assert re.search(rf"\| {re.escape(chosen[1])} \| {number} / {number} / - \|", text), text
    s = quick_settings()
    student = hts_probe.hts_student(s, dense, hts_probe.VARIANTS[chosen[1]])
    learning = {n for n, p in student.named_parameters() if p.requires_grad}
    assert learning and all(n.startswith("predictors.") for n in learning)
    assert student.config.hts_sampling == "gumbel-topk"


# -- adaptive_budget: the per-image token budget (issue 26) ---------------------------------------


def test_adaptive_budget_keeps_each_images_count_of_its_best_alive_tokens():
    logit = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    alive = torch.tensor([[1.0, 1, 1, 1], [0.0, 1, 1, 1]])  # token 0 of image 1 already dropped
    kept = adaptive_budget.ranked_keep(logit, alive, torch.tensor([2, 2]))
    assert kept.tolist() == [[0, 1, 0, 1], [0, 1, 1, 0]]
    budget = adaptive_budget.Budget(thresholds=[0.45], k_min=[1], k_max=[3])
    # over 0.45: image 0 has 3 (0.9, 0.5, 0.7), image 1 none alive -> clamped up to k_min
    assert adaptive_budget.adaptive_counts(0, logit, alive, budget).tolist() == [3, 1]


def test_adaptive_budget_batch_ratio_loss_by_hand():
    # two images, one stage, target 0.5: kept shares 0.25 and 0.75 -> batch mean on target;
    # bounds [0.5 * 0.5, 1.5 * 0.5] = [0.25, 0.75] hold: the loss is 0
    masks = [torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]])]
    loss = adaptive_budget.batch_ratio_loss(0.5, 1.5)
    assert loss(masks, [0.5]).item() == pytest.approx(0.0)
    # the paper's per-image loss is not 0 there: (0.25^2 + 0.25^2) / 2
    from sureid.losses import ratio_loss

    assert ratio_loss(masks, [0.5]).item() == pytest.approx(0.0625)
    # one image far below its bound: mean (0 + 0.5) / 2 = 0.25 off, below-bound (0.25 - 0)^2 / 2
    masks = [torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 0, 0]])]
    assert loss(masks, [0.5]).item() == pytest.approx(0.25**2 + 0.25**2 / 2)


@pytest.mark.slow
def test_adaptive_budget_smoke_run_on_a_demo_folder(tiny_synthetic_root, tmp_path, capsys):
    folder = _demo_folder(tiny_synthetic_root, tmp_path)
    torch.manual_seed(0)
    student = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))).eval()
    student.save_pretrained(folder / "hts_npkd_noda")
    data = load_reid_dataset("synthetic", folder / "data")
    budget = adaptive_budget.calibrate(student, data["train"], 1.0, 0.5, 1.5)
    _, counts = adaptive_budget.run_masked(
        student, data["train"], adaptive_budget.adaptive_decisions(budget)
    )
    # calibrated on these images: their mean kept count per stage is the fixed k (to 1 token)
    means = counts.float().mean(dim=0).tolist()
    assert means == pytest.approx(student.config.stage_keep_counts, abs=1.0)
    adaptive_budget.main(
        [str(folder), "--rows", "hts_npkd_noda", "--budgets", "1.0", "0.9", "--shuffled"]
    )
    out = capsys.readouterr().out
    for method in ("fixed-k", "adaptive x1.0", "shuffled counts x1.0", "fixed-k x0.9"):
        assert f"| hts_npkd_noda | {method} |" in out, out
