"""The demo's backbone: made by pretrain_backbone, checked on load, copied into every model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sureid import SureidStudentConfig, SureidStudentModel
from sureid.demo import (
    BUILTIN_BACKBONE,
    DemoSettings,
    _encoder_kwargs,
    _init_from,
    load_backbone,
    pretrain_backbone,
    quick_settings,
    run_demo,
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
    assert json.loads(meta["recipe"]) == dict(steps=2, num_ids=6, seed=1, learning_rate=1e-3)
    assert json.loads(meta["shape"])["hidden_size"] == 32


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


def test_builtin_backbone_fits_the_default_settings():
    backbone = load_backbone(BUILTIN_BACKBONE, DemoSettings())
    assert "other synthetic people" in backbone["description"]


def test_demo_with_a_backbone_reports_it_as_a_row(tiny_backbone, tmp_path):
    path, settings = tiny_backbone
    settings.out_dir = str(tmp_path / "demo")
    settings.backbone = str(path)
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
    assert "demo backbone" in report
    # The HTS row carries the predictor check: one spread per stage, a random-keep score.
    check = rows[1].extra["predictor_check"]
    assert len(check["keep_prob_spread"]) == 3 and 0.0 <= check["random_rank1"] <= 1.0
    assert "Predictor check" in report and "predictor_check" not in rows[0].extra
