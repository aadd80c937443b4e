"""The demo: its backbones (made by pretrain_backbone, checked on load, copied into the models),
its steps and its report with the predictor check."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from sureid import SureidStudentConfig, SureidStudentModel
from sureid.demo import (
    BUILTIN_BACKBONE,
    BUILTIN_TEACHER_BACKBONE,
    DemoSettings,
    _encoder_kwargs,
    _init_from,
    _train,
    backbone_model,
    check_settings,
    load_backbone,
    pretrain_backbone,
    pretrain_dense_model,
    quick_settings,
    run_demo,
    train_student,
    training_arguments,
)

TINY_DEMO = dict(train_ids=6, timing_batch=2, rows=("dense", "hts"))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone") / "backbone.safetensors"
    settings = quick_settings(**TINY_DEMO)
    return pretrain_backbone(out, settings, steps=2, num_ids=6, log=lambda _m: None), settings


def test_backbone_file_holds_the_encoder_in_float16_with_its_recipe(tiny_backbone):
    path, settings = tiny_backbone
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    model = SureidStudentModel(
        SureidStudentConfig(
            **_encoder_kwargs(settings),
            hidden_size=32,
            num_attention_heads=2,
            sparsify_layers=(),
            keep_rate=1.0,
        )
    )
    assert keys == set(model.encoder.state_dict())  # the encoder only: no head, no predictors
    assert dtypes == {torch.float16}
    assert json.loads(meta["recipe"]) == dict(steps=2, num_ids=6, seed=1000, learning_rate=1e-3)
    assert json.loads(meta["shape"])["hidden_size"] == 32


def test_pretrain_dense_model_with_a_register_token(tmp_path):
    """num_prefix_tokens=2: a second prefix token that trains and that the head never reads."""
    settings = quick_settings(**TINY_DEMO)
    model, seconds = pretrain_dense_model(
        settings, steps=2, num_ids=6, work_dir=tmp_path, num_prefix_tokens=2, log=lambda _m: None
    )
    assert model.config.num_prefix_tokens == 2 and not model.training and seconds > 0
    register = model.encoder.dist_token
    assert register is not None and register.abs().sum() > 0  # initialised, and trained
    pixels = torch.rand(2, 3, *settings.image_size)
    with torch.no_grad():
        before = model(pixel_values=pixels).features
        register.add_(torch.randn_like(register))  # not a constant: LayerNorm removes that
        after = model(pixel_values=pixels).features
    assert not torch.allclose(before, after)  # the class token reads it through attention
    with pytest.raises(ValueError, match="must differ"):
        pretrain_dense_model(settings, steps=1, seed=settings.seed, work_dir=tmp_path)


def test_init_from_copies_the_encoder_and_leaves_predictors_new(tiny_backbone):
    path, settings = tiny_backbone
    backbone = load_backbone(path, settings)
    config = SureidStudentConfig(
        **_encoder_kwargs(settings),
        hidden_size=32,
        num_attention_heads=2,
        sparsify_layers=(1, 2, 3),
        keep_rate=0.7,
    )
    torch.manual_seed(0)
    model = SureidStudentModel(config)
    predictors = {k: v.clone() for k, v in model.predictors.state_dict().items()}
    assert _init_from(model, backbone)
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, backbone["tensors"][name]), name
    for name, tensor in model.predictors.state_dict().items():
        assert torch.equal(tensor, predictors[name]), name
    # Another width does not fit: left untouched, reported as False.
    wider = SureidStudentModel(
        SureidStudentConfig(
            **_encoder_kwargs(settings),
            hidden_size=64,
            num_attention_heads=2,
            sparsify_layers=(),
            keep_rate=1.0,
        )
    )
    before = {k: v.clone() for k, v in wider.encoder.state_dict().items()}
    assert not _init_from(wider, backbone)
    assert all(torch.equal(v, before[k]) for k, v in wider.encoder.state_dict().items())


def test_load_backbone_errors_name_the_file_and_the_fix(tiny_backbone, tmp_path):
    path, settings = tiny_backbone
    with pytest.raises(ValueError, match=r"another shape.*hidden_size.*\(32, 96\)"):
        load_backbone(path, DemoSettings())
    with pytest.raises(FileNotFoundError, match="make_demo_backbone.py"):
        load_backbone(tmp_path / "missing.safetensors", settings)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable"):
        load_backbone(garbage, settings)
    with pytest.raises(ValueError, match="must differ"):
        pretrain_backbone(tmp_path / "b.safetensors", settings, steps=1, seed=settings.seed)
    # A demo run with the backbone's own seed would train on the backbone's people.
    clash = dataclasses.replace(settings, seed=1000)
    with pytest.raises(ValueError, match="seed 1000, the demo's own seed.*another --seed"):
        load_backbone(path, clash)
    # The teacher's backbone is checked against the teacher's shape.
    with pytest.raises(ValueError, match=r"another shape.*hidden_size"):
        load_backbone(path, dataclasses.replace(settings, teacher_hidden=64), role="teacher")


def test_builtin_backbones_fit_the_default_settings():
    backbone = load_backbone(BUILTIN_BACKBONE, DemoSettings())
    assert "other synthetic people" in backbone["description"]
    teacher = load_backbone(BUILTIN_TEACHER_BACKBONE, DemoSettings(), role="teacher")
    assert teacher["tensors"]["pos_embed"].shape[-1] == DemoSettings().teacher_hidden == 192
    # backbone_model builds either role's shape around its built-in weights
    for role, tensors in (("student", backbone["tensors"]), ("teacher", teacher["tensors"])):
        model = backbone_model(role=role)
        assert not model.training and model.config.num_identities == 0
        state = model.encoder.state_dict()
        assert all(torch.equal(state[name], value) for name, value in tensors.items())


def test_settings_that_cannot_run_are_refused():
    with pytest.raises(ValueError, match="unknown demo rows.*'nope'"):
        check_settings(quick_settings(rows=("dense", "nope")))
    with pytest.raises(ValueError, match="hts_init must be 'dense' or 'backbone'"):
        check_settings(quick_settings(hts_init="teacher"))
    check_settings(quick_settings(rows=("hts",)))


def test_demo_with_a_backbone_reports_it_as_a_row(tiny_backbone, tmp_path):
    path, settings = tiny_backbone
    settings = dataclasses.replace(settings, out_dir=str(tmp_path / "demo"), backbone=str(path))
    rows = run_demo(settings, log=lambda _m: None)
    names = [r.name for r in rows]
    assert names == [
        "DeiT-S-like student, dense",
        "+ HTS",
        "teacher (hidden 32)",
        "pretrained backbone, not fine-tuned",
    ]
    assert rows[-1].train_seconds == 0.0 and rows[-1].tokens_last_stage == 32
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "demo backbone" in report and "same budget" in report
    # every row fine-tuned from the one dense start, which is saved beside them
    assert (tmp_path / "demo" / "dense_start" / "model.safetensors").is_file()
    # The HTS row carries the predictor check against the teacher; its R1 / mAP are the row's.
    check = rows[1].check
    assert set(check) == {
        "predictor_R1",
        "predictor_mAP",
        "random_R1",
        "random_mAP",
        "random_R1_min",
        "random_R1_max",
        "guide_R1",
        "guide_mAP",
        "spearman",
        "spearman_attention_norm",
        "body_share",
        "guide_body_share",
        "body_chance",
        "body_share_stage1",
        "body_share_stage2",
        "body_share_stage3",
        "body_auc",
        "guide_body_auc",
        "stage1_ranking_R1",
        "stage1_ranking_mAP",
        "occluder_dropped_R1",
        "occluder_dropped_mAP",
        "occluder_share",
        "occluder_chance",
        "sampling_overlap",
        "sampling_overlap_chance",
    }
    assert (check["predictor_R1"], check["predictor_mAP"]) == (rows[1].rank1, rows[1].mAP)
    assert -1.0 <= check["spearman"] <= 1.0 and 0.0 < check["body_chance"] < 1.0
    assert check["random_R1_min"] <= check["random_R1"] <= check["random_R1_max"]
    assert 0.0 <= check["body_auc"] <= 1.0 and 0.0 <= check["guide_body_auc"] <= 1.0
    assert rows[0].check is None and rows[2].check is None
    assert "Predictor check" in report and "kept on visible body" in report
    # the occluder measures, from the synthetic set's occluder masks
    assert 0.0 < check["occluder_chance"] < 1.0 and 0.0 <= check["occluder_share"] <= 1.0
    assert check["stage1_ranking_R1"] is not None and check["occluder_dropped_R1"] is not None
    assert "kept on the occluder" in report
    assert 0.0 <= check["sampling_overlap"] <= 1.0 and 0.0 < check["sampling_overlap_chance"] < 1
    assert (tmp_path / "demo" / "kept_tokens.png").stat().st_size > 0


def test_training_arguments_carry_the_demos_optimiser_and_augmentation(tmp_path):
    """Every model of the demo trains with these: its batch, optimiser, random patch and loss
    readings (which a probe may override)."""
    settings = dataclasses.replace(
        quick_settings(),
        random_patch=0.0,
        random_erasing=0.25,
        ratio_on="probabilities",
        feature_reduction="sum",
    )
    args = training_arguments(settings, tmp_path, num_train_epochs=2)
    assert args.random_patch == 0.0 and args.ratio_on == "probabilities"
    assert args.random_erasing == 0.25
    assert args.feature_reduction == "sum"
    occlusion = dataclasses.replace(quick_settings(), lambda_occlusion=0.5)
    assert training_arguments(occlusion, tmp_path).lambda_occlusion == 0.5
    # rows without NODA have no pasted occluder to learn from: they train without the term
    assert training_arguments(occlusion, tmp_path, noda=False).lambda_occlusion == 0.0
    assert training_arguments(settings, tmp_path, ratio_on="decisions").ratio_on == "decisions"
    assert args.per_device_train_batch_size == settings.identities_per_batch * settings.instances
    assert (args.learning_rate, args.weight_decay) == (settings.learning_rate, 5e-2)
    paper = training_arguments(quick_settings(), tmp_path)
    assert paper.random_patch == 0.5 and paper.random_erasing == 0.5  # the paper's
    assert paper.ratio_on == "decisions"
    assert paper.feature_reduction == "mean"  # our reading of eq. (13)
    assert paper.lambda_occlusion == 0.0  # beyond the paper: off


def test_backbone_freeze_reaches_the_hts_rows_only(tmp_path, monkeypatch):
    """``freeze_backbone_steps`` holds an HTS student's backbone still while its predictors
    learn; a dense model has no predictors, so it trains from the first step."""
    from types import SimpleNamespace

    import sureid.trainer
    from sureid import SureidTeacherConfig, SureidTeacherModel
    from sureid.trainer import _has_hts

    from .conftest import TINY

    seen = {}

    class Recorder:
        def __init__(self, model, args, **_):
            seen[model.config.model_type, _has_hts(model)] = args.freeze_backbone_steps
            self.state = SimpleNamespace(log_history=[])

        def train(self):
            pass

    monkeypatch.setattr(sureid.trainer, "SureidTrainer", Recorder)
    settings = dataclasses.replace(quick_settings(), freeze_backbone_steps=7)
    hts = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5)))
    dense = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1,), keep_rate=1.0))
    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY))
    for name, model in (("hts", hts), ("dense", dense), ("teacher", teacher)):
        _train(model, {"train": None}, settings, tmp_path / name, 1)
    assert seen == {
        (hts.config.model_type, True): 7,
        (dense.config.model_type, False): 0,
        (teacher.config.model_type, False): 0,
    }
    assert DemoSettings().freeze_backbone_steps == 0  # the paper's recipe: no freeze


def test_topk_epochs_end_the_hts_rows_with_the_inference_decisions(tmp_path, monkeypatch):
    """``hts_topk_epochs``: the last epochs of an HTS row train with the inference decisions,
    in the same run (one schedule); the config keeps its own sampling afterwards, also when
    training fails. A dense row has no predictors: its own sampling throughout."""
    from types import SimpleNamespace

    import sureid.trainer
    from sureid.trainer import _has_hts

    runs = []

    class Recorder:
        fail = False

        def __init__(self, model, args, callbacks=None, **_):
            self.model, self.args, self.callbacks = model, args, callbacks or []
            self.state = SimpleNamespace(log_history=[])

        def train(self):  # one epoch after another, as transformers' Trainer calls them
            seen = []
            for _ in range(int(self.args.num_train_epochs)):
                for callback in self.callbacks:
                    callback.on_epoch_begin(self.args, None, None)
                seen.append(self.model.config.hts_sampling)
            runs.append((_has_hts(self.model), seen))
            if Recorder.fail:
                raise RuntimeError("boom")

    monkeypatch.setattr(sureid.trainer, "SureidTrainer", Recorder)
    settings = dataclasses.replace(quick_settings(), student_epochs=4, hts_topk_epochs=1.5)
    data = {"train": {"pid": [0, 1, 2]}}
    hts = train_student("hts", settings, data, tmp_path, log=lambda *_: None)
    train_student("dense", settings, data, tmp_path, log=lambda *_: None)
    assert runs == [
        (True, ["gumbel", "gumbel", "gumbel", "topk"]),  # epochs 0-3: from 4 - 1.5 = 2.5 on
        (False, ["gumbel"] * 4),
    ]
    assert hts.model.config.hts_sampling == "gumbel"
    assert SureidStudentConfig.from_pretrained(tmp_path / "hts").hts_sampling == "gumbel"
    Recorder.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        _train(hts.model, data, settings, tmp_path / "failed", 4, topk_epochs=1.5)
    assert runs[-1] == (True, ["gumbel", "gumbel", "gumbel", "topk"])
    assert hts.model.config.hts_sampling == "gumbel"  # restored although training failed
    assert DemoSettings().hts_topk_epochs == 0  # the paper's recipe: off
    for bad in (dict(hts_topk_epochs=-1), dict(hts_epochs=2, hts_topk_epochs=2)):
        with pytest.raises(ValueError, match="hts_topk_epochs must be >= 0"):
            check_settings(dataclasses.replace(quick_settings(), **bad))
    with pytest.raises(ValueError, match="use hts_topk_epochs"):
        check_settings(dataclasses.replace(quick_settings(), hts_sampling="topk"))
