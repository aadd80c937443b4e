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
    DEMO_TRAINING,
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


@pytest.mark.slow
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


def test_unknown_training_fields_are_refused_by_name():
    """``DemoSettings.training`` holds SureidTrainingArguments' fields only: a retired option
    (or a typo) is named, not silently ignored."""
    settings = quick_settings()
    for key in ("token_guidance", "lambda_occlusion", "learning_rat"):
        bad = dataclasses.replace(settings, training={**settings.training, key: 1})
        with pytest.raises(ValueError, match=f"DemoSettings.training has \\['{key}'\\]"):
            check_settings(bad)
    check_settings(dataclasses.replace(settings, training={"lambda_token": 1.0}))
    for retired in ("hts_topk_epochs", "token_guidance", "hts_guide", "learning_rate"):
        assert retired not in {f.name for f in dataclasses.fields(DemoSettings)}, retired


@pytest.mark.slow
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


def test_training_arguments_carry_the_demos_training(tmp_path):
    """Every model of the demo trains with ``settings.training`` (overrides of
    SureidTrainingArguments' fields); the call's own fields (schedule, NODA) come on top."""
    settings = quick_settings()
    args = training_arguments(settings, tmp_path, num_train_epochs=2)
    for name, value in settings.training.items():
        assert getattr(args, name) == value, name
    assert (args.per_device_train_batch_size, args.num_instances) == (8, 2)  # quick: 4 x 2
    assert args.num_train_epochs == 2 and args.output_dir == str(tmp_path)
    assert args.save_strategy == "no" and args.seed == settings.seed
    assert args.random_patch == 0.5 and args.random_erasing == 0.5  # the paper's, untouched
    assert args.lambda_token == 0.0  # beyond the paper: off unless asked
    full = training_arguments(DemoSettings(), tmp_path)
    assert {k: getattr(full, k) for k in DEMO_TRAINING} == DEMO_TRAINING
    assert full.per_device_train_batch_size == 32 and full.predictor_learning_rate == 5e-3
    # a probe adds token guidance (or any other field) through the settings ...
    guided = dataclasses.replace(settings, training={**settings.training, "lambda_token": 1.0})
    assert training_arguments(guided, tmp_path).lambda_token == 1.0
    # ... and a call's fields win over the settings'
    assert training_arguments(settings, tmp_path, learning_rate=1e-3).learning_rate == 1e-3
    assert DemoSettings().training is not DemoSettings().training  # no shared default dict


def test_train_hands_the_demos_training_to_the_trainer(tmp_path, monkeypatch):
    """``_train``: the settings' training for every model, the row's epochs, NODA and teacher;
    the model saved into ``out``; (seconds, last log)."""
    from types import SimpleNamespace

    import sureid.trainer

    from .conftest import TINY

    seen = []

    class Recorder:
        def __init__(self, model, args, train_dataset=None, teacher=None, **kwargs):
            seen.append((model, args, train_dataset, teacher, kwargs))
            self.state = SimpleNamespace(log_history=[{"loss": 1.0, "loss_cls": 0.5}])

        def train(self):
            pass

    monkeypatch.setattr(sureid.trainer, "SureidTrainer", Recorder)
    settings = quick_settings()
    teacher = object()
    hts = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5)))
    seconds, last = _train(
        hts, {"train": "the train split"}, settings, tmp_path / "hts", 3, teacher=teacher, noda=True
    )
    assert seconds >= 0 and last == {"loss": 1.0, "loss_cls": 0.5}
    ((model, args, train, given, kwargs),) = seen
    assert model is hts and train == "the train split" and given is teacher and kwargs == {}
    assert args.num_train_epochs == 3 and args.noda is True
    assert args.predictor_learning_rate == settings.training["predictor_learning_rate"]
    assert args.optim == "adamw_torch" and args.output_dir == str(tmp_path / "hts")
    assert SureidStudentConfig.from_pretrained(tmp_path / "hts").sparsify_layers == [1, 3, 5]
