"""Config fields, derived geometry, validation messages and AutoConfig registration."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
from transformers import AutoConfig

from sureid import SureidConfig, SureidStudentConfig, SureidTeacherConfig, configuration_sureid


def test_defaults_follow_the_paper():
    s = SureidStudentConfig()
    assert s.image_size == [256, 128] and s.patch_size == 16 and s.stride_size == 16
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads) == (384, 12, 6)
    assert s.sparsify_layers == [3, 6, 9] and s.keep_rate == 0.7
    assert s.cls_reweight and s.cls_reweight_init == 0.5 and s.gumbel_tau == 1.0
    assert s.grid_size == (16, 8) and s.num_patches == 128
    # p, p^2, p^3 of 128 tokens, rounded half up: 89.6 -> 90, 62.72 -> 63, 43.9 -> 44
    assert s.stage_keep_counts == [90, 63, 44]
    t = SureidTeacherConfig()
    assert (t.hidden_size, t.num_attention_heads, t.model_type) == (768, 12, "sureid-teacher")


def test_overlapping_patches_grid():
    c = SureidStudentConfig(stride_size=12)
    # TransReID's overlapping patches at 256x128: (256-16)//12+1 = 21 rows, (128-16)//12+1 = 10 cols
    assert c.grid_size == (21, 10) and c.num_patches == 210


def test_tokens_per_block_follow_the_schedule():
    c = SureidStudentConfig()
    assert c.tokens_per_block() == [129] * 3 + [91] * 3 + [64] * 3 + [45] * 3
    assert SureidStudentConfig(keep_rate=1.0).tokens_per_block() == [129] * 12
    assert SureidStudentConfig(num_prefix_tokens=2).tokens_per_block()[0] == 130


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"keep_rate": 0.0}, "keep_rate"),
        ({"keep_rate": 1.2}, "keep_rate"),
        ({"keep_rate": float("nan")}, "keep_rate"),
        ({"sparsify_layers": (6, 3, 9)}, "sparsify_layers"),
        ({"sparsify_layers": (3, 6, 12)}, "sparsify_layers"),
        ({"sparsify_layers": (0, 6)}, "sparsify_layers"),
        ({"hidden_size": 100, "num_attention_heads": 6}, "hidden_size"),
        ({"image_size": (255, 128)}, "image_size"),
        ({"image_size": (256, 127)}, "image_size"),
        ({"image_size": (256,)}, "image_size"),
        ({"stride_size": 20}, "stride_size"),
        ({"num_prefix_tokens": 3}, "num_prefix_tokens"),
        ({"neck_feat": "middle"}, "neck_feat"),
        ({"gumbel_tau": 0.0}, "gumbel_tau"),
        ({"image_mean": (0.5, 0.5)}, "image_mean"),
        ({"image_std": (0.2, float("nan"), 0.2)}, "image_std"),
        ({"gumbel_tau": float("nan")}, "gumbel_tau"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio"),
        ({"layer_norm_eps": -1e-6}, "layer_norm_eps"),
        ({"layer_norm_eps": float("inf")}, "layer_norm_eps"),
        ({"initializer_range": float("nan")}, "initializer_range"),
        ({"cls_reweight_init": float("nan")}, "cls_reweight_init"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SureidStudentConfig(**kwargs)


def test_autoconfig_round_trip(tmp_path):
    c = SureidStudentConfig(keep_rate=0.5, num_identities=7, stride_size=12)
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SureidStudentConfig
    assert loaded.keep_rate == 0.5 and loaded.num_identities == 7 and loaded.grid_size == (21, 10)
    assert loaded.stage_keep_counts == c.stage_keep_counts


@pytest.mark.parametrize("cls", [SureidConfig, SureidTeacherConfig, SureidStudentConfig])
def test_every_field_has_an_args_line_with_its_default(cls):
    """Docs in code, as transformers' ViTConfig: one ``name (`type`, ..., defaults to ...)`` line
    per constructor field, and an example."""
    doc = cls.__doc__
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "kwargs"):
            continue
        line = re.search(rf"^\s+{name} \(`.+`, \*optional\*, defaults to `(.+)`\):$", doc, re.M)
        assert line, f"{cls.__name__}: no Args line for {name}"
        written = line.group(1)
        documented = getattr(configuration_sureid, written, None) or ast.literal_eval(written)
        assert documented == parameter.default, f"{cls.__name__}.{name}: {written}"
    assert "Example:" in doc and ">>> " in doc
