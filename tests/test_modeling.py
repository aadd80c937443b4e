"""Teacher / student forward passes, the two HTS paths, masked attention, save/load, AutoModel."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from sureid import (
    SureidError,
    SureidModel,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.modeling_sureid import Block, masked_softmax

from .conftest import TINY


def _student(config, seed=0):
    torch.manual_seed(seed)
    return SureidStudentModel(config)


def test_teacher_forward_shapes(tiny_teacher_config, pixels):
    model = SureidTeacherModel(tiny_teacher_config).eval()
    out = model(pixels, labels=torch.tensor([0, 1, 2]))
    assert out.features.shape == (3, 64) and out.embeddings.shape == (3, 64)
    assert out.logits.shape == (3, 10) and out.loss.ndim == 0
    assert out.keep_masks is None and out.kept_indices is None


def test_neck_feat_selects_the_embedding(tiny_student_config, pixels):
    model = _student(tiny_student_config).eval()
    out = model(pixels)
    assert torch.allclose(out.embeddings, model.head.bottleneck(out.features))
    tiny_student_config.neck_feat = "before"
    out = _student(tiny_student_config).eval()(pixels)
    assert torch.equal(out.embeddings, out.features)


def test_eval_really_drops_tokens(tiny_student_config, pixels):
    model = _student(tiny_student_config).eval()
    counts = tiny_student_config.stage_keep_counts
    seen = []

    def record(_module, args, _kwargs=None):
        seen.append(args[0].shape[1])

    for block in model.encoder.blocks:
        block.register_forward_pre_hook(record)
    with torch.no_grad():
        out = model(pixels)
    assert seen == tiny_student_config.tokens_per_block()
    assert [k.shape for k in out.kept_indices] == [torch.Size([3, c]) for c in counts]
    n = tiny_student_config.num_patches
    for earlier, later in zip(out.kept_indices, out.kept_indices[1:]):
        for b in range(3):
            assert set(later[b].tolist()) <= set(earlier[b].tolist())
    for stage in out.kept_indices:
        assert int(stage.min()) >= 0 and int(stage.max()) < n
        assert all(len(set(row.tolist())) == row.numel() for row in stage)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_prefix_tokens": 2},
        {"stride_size": 6, "keep_rate": 0.5},
        {"sparsify_layers": (2,), "keep_rate": 0.3},
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_dropped_path_equals_masked_path(overrides, seed):
    config = SureidStudentConfig(**{**TINY, "sparsify_layers": (1, 3, 5), **overrides})
    model = _student(config, seed).eval()
    # Random, non-trivial weights everywhere (init leaves some parts near zero).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dropped = model(x)
        masked = model(x, hts_decisions="topk")
    assert dropped.kept_indices is not None and masked.keep_masks is not None
    torch.testing.assert_close(dropped.features, masked.features, atol=1e-5, rtol=0)
    # Same decisions: the masked path's final mask marks exactly the dropped path's final tokens.
    final = torch.zeros_like(masked.keep_masks[-1]).scatter(1, dropped.kept_indices[-1], 1.0)
    assert torch.equal(final, masked.keep_masks[-1])


def test_random_decisions_keep_the_same_counts_as_topk(tiny_student_config, pixels):
    model = _student(tiny_student_config).eval()
    torch.manual_seed(0)
    topk = model(pixels, hts_decisions="topk").keep_masks
    random = model(pixels, hts_decisions="random").keep_masks
    for a, b in zip(topk, random):
        torch.testing.assert_close(a.sum(dim=1), b.sum(dim=1))
    assert any(not torch.equal(a, b) for a, b in zip(topk, random))
    for earlier, later in zip(random, random[1:]):
        assert bool((later <= earlier).all())  # a dropped token stays dropped


def test_training_masks_are_binary_monotone_and_differentiable(tiny_student_config, pixels):
    model = _student(tiny_student_config).train()
    out = model(pixels, labels=torch.tensor([0, 1, 2]))
    assert len(out.keep_masks) == 3 and len(out.keep_probs) == 3
    for mask in out.keep_masks:
        assert mask.shape == (3, tiny_student_config.num_patches)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # Stage 1 (before block 1) scores block 0's image tokens with every token still kept: its
    # keep probability is softmax(predictor logits)[..., 1] of exactly those tokens.
    with torch.no_grad():
        tokens = model.encoder.blocks[0](model.encoder.embed(pixels))[:, 1:]
        logits = model.predictors[0](tokens, torch.ones(3, tokens.shape[1]))
    torch.testing.assert_close(out.keep_probs[0].detach(), logits.softmax(-1)[..., 1])
    for earlier, later in zip(out.keep_masks, out.keep_masks[1:]):
        assert bool((later <= earlier).all())
    # The ratio-loss-like term and the identity loss both reach the predictors.
    loss = out.loss + sum(m.mean() for m in out.keep_masks)
    loss.backward()
    for predictor in model.predictors:
        assert predictor.out_conv[-1].weight.grad.abs().sum() > 0


def test_predictor_gets_gradient_through_masked_attention_alone(tiny_student_config, pixels):
    model = _student(tiny_student_config).train()
    model(pixels).features.pow(2).sum().backward()
    assert model.predictors[0].out_conv[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_no_nan_when_every_image_token_is_dropped(tiny_student_config, pixels, dtype):
    model = _student(tiny_student_config).train()
    with torch.no_grad():
        for predictor in model.predictors:  # drop logit >> keep logit: every decision is "drop"
            predictor.out_conv[-1].bias.copy_(torch.tensor([50.0, -50.0]))
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(pixels * 100, labels=torch.tensor([0, 1, 2]))
    assert all(float(m.detach().sum()) == 0 for m in out.keep_masks)
    assert torch.isfinite(out.features).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_masked_softmax_follows_eq_6():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 5) * 30
    scores[0, 0, 2, 4] = 1e4  # a huge score on a dropped key must not swamp the row
    policy = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    attn = masked_softmax(scores, policy)
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                if i != j and policy[b, j] == 0:
                    assert attn[b, :, i, j].abs().max() == 0  # nobody attends to a dropped token
    # Every row is a plain softmax over its allowed keys {j : j == i or policy_j == 1}.
    for b in range(2):
        for i in range(5):
            allowed = [j for j in range(5) if j == i or policy[b, j] == 1]
            ref = scores[b, :, i, allowed].softmax(-1)
            torch.testing.assert_close(attn[b, :, i, allowed], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_class_token_only_block_equals_row_0_of_the_full_block(masked, qkv_bias):
    """The models run their last block on the class token's row alone; it must be that row."""
    torch.manual_seed(0)
    block = Block(SureidTeacherConfig(**TINY, qkv_bias=qkv_bias), drop_path=0.0)
    x = torch.randn(3, 9, 64, requires_grad=True)
    policy = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0]] * 3, dtype=torch.float32)
    policy = policy if masked else None
    full = block(x, policy)[:, :1]
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    row = block(x, policy, cls_only=True)
    assert row.shape == (3, 1, 64)
    (grad_row,) = torch.autograd.grad(row.square().sum(), x)
    torch.testing.assert_close(row, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_row, grad_full, atol=1e-5, rtol=1e-5)
    # Row 0 of eq. (6) on a single query row is row 0 of the full masked softmax.
    if masked:
        scores = torch.randn(3, 4, 9, 9)
        torch.testing.assert_close(
            masked_softmax(scores[:, :, :1], policy), masked_softmax(scores, policy)[:, :, :1]
        )


def test_class_token_reweight_is_training_only(tiny_student_config, pixels):
    model = _student(tiny_student_config)
    assert float(model.cls_reweight_lambda) == pytest.approx(0.5)
    torch.manual_seed(3)
    model.train()
    with_reweight = model(pixels, hts_decisions="topk").features
    with torch.no_grad():
        model.cls_reweight_lambda.zero_()
    without = model(pixels, hts_decisions="topk").features
    assert (with_reweight - without).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        a = model(pixels).features
        model.cls_reweight_lambda.fill_(0.9)
        b = model(pixels).features
    assert torch.equal(a, b)


def test_keep_rate_one_has_no_predictors_and_computes_the_dense_vit(pixels):
    model = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3), keep_rate=1.0))
    assert len(model.predictors) == 0
    out = model.eval()(pixels)
    assert out.kept_indices is None
    # The dense path by hand: every block on every token, the final norm, the class token.
    with torch.no_grad():
        x = model.encoder.embed(pixels)
        for block in model.encoder.blocks:
            x = block(x)
        dense = model.encoder.norm(x)[:, 0]
    torch.testing.assert_close(out.features, dense, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors(tiny_student_config):
    model = _student(tiny_student_config).eval()
    with pytest.raises(SureidError, match="image_size"):
        model(torch.randn(1, 3, 256, 128))
    no_classifier = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5)))
    with pytest.raises(SureidError, match="num_identities"):
        no_classifier(torch.randn(2, 3, 64, 32), labels=torch.tensor([0, 1]))
    with pytest.raises(SureidError, match="hts_decisions"):
        model(torch.randn(1, 3, 64, 32), hts_decisions="sample")


def test_one_channel_integer_and_float64_batches(tiny_student_config, pixels):
    model = _student(tiny_student_config).eval()
    with pytest.raises(SureidError, match=r"\[B, 3, 64, 32\].*\[3, 1, 64, 32\].*grayscale"):
        model(pixels[:, :1])
    with pytest.raises(SureidError, match="float tensor.*torch.uint8.*SureidImageProcessor"):
        model((pixels * 50).clamp(0, 255).to(torch.uint8))
    with torch.no_grad():  # numpy's float64 is computed in the weights' float32
        expected = model(pixels).embeddings
        got = model(pixels.double()).embeddings
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_save_and_load_round_trip_bit_exact(
    tmp_path, kind, tiny_student_config, tiny_teacher_config, pixels
):
    cls = SureidStudentModel if kind == "student" else SureidTeacherModel
    config = tiny_student_config if kind == "student" else tiny_teacher_config
    model = cls(config)
    model.train()
    model(pixels)  # move BN running statistics away from their init
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))
    for loader in (cls.from_pretrained, SureidModel.from_pretrained, AutoModel.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is cls
        ref, got = model.state_dict(), loaded.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), loader
        with torch.no_grad():
            assert torch.equal(model(pixels).features, loaded.eval()(pixels).features)


def test_loading_weights_of_another_shape_names_the_tensors(tmp_path, tiny_student_config):
    SureidStudentModel(tiny_student_config).save_pretrained(tmp_path)
    other = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), num_identities=12)
    with pytest.raises(SureidError, match=r"head\.classifier\.weight.*\(10, 64\).*\(12, 64\)"):
        SureidStudentModel.from_pretrained(tmp_path, config=other)
    loaded = SureidStudentModel.from_pretrained(
        tmp_path, config=other, ignore_mismatched_sizes=True
    )
    assert loaded.head.classifier.weight.shape == (12, 64)
    fewer_stages = SureidStudentConfig(**TINY, sparsify_layers=(1, 3), num_identities=10)
    with pytest.raises(SureidError, match=r"predictors\.2"):
        SureidStudentModel.from_pretrained(tmp_path, config=fewer_stages)


def test_sureid_model_is_only_a_loader(tmp_path):
    with pytest.raises(TypeError, match="from_pretrained"):
        SureidModel()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="bert"):
        SureidModel.from_pretrained(tmp_path)


def test_broken_checkpoints_name_the_file_at_fault(tmp_path, tiny_student_config):
    import shutil

    good = tmp_path / "good"
    _student(tiny_student_config).save_pretrained(good)

    def broken(name):
        path = tmp_path / name
        shutil.copytree(good, path)
        return path

    corrupt = broken("corrupt")  # e.g. an interrupted download
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for loader in (SureidModel.from_pretrained, SureidStudentModel.from_pretrained):
        with pytest.raises(SureidError, match=f"not a valid safetensors file: {weights}"):
            loader(corrupt)
    truncated = broken("truncated")
    text = (truncated / "config.json").read_text()
    (truncated / "config.json").write_text(text[: len(text) // 2])
    for loader in (SureidModel.from_pretrained, SureidStudentModel.from_pretrained):
        with pytest.raises(SureidError, match=r"config\.json is not valid JSON .*truncated"):
            loader(truncated)
    no_weights = broken("no_weights")  # a save interrupted after config.json
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(OSError, match="has config.json but no model.safetensors"):
        SureidModel.from_pretrained(no_weights)
    with pytest.raises(FileNotFoundError, match=f"no such checkpoint folder: {tmp_path / 'nope'}"):
        SureidModel.from_pretrained(tmp_path / "nope")


def test_a_checkpoint_loaded_as_the_other_kind_names_the_right_loader(
    tmp_path, tiny_student_config, tiny_teacher_config
):
    SureidTeacherModel(tiny_teacher_config).save_pretrained(tmp_path / "teacher")
    SureidStudentModel(tiny_student_config).save_pretrained(tmp_path / "student")
    with pytest.raises(
        SureidError, match="is a teacher checkpoint; use SureidModel.from_pretrained"
    ):
        SureidStudentModel.from_pretrained(tmp_path / "teacher")
    with pytest.raises(SureidError, match="is a student checkpoint; .* SureidStudentModel"):
        SureidTeacherModel.from_pretrained(tmp_path / "student")
    assert isinstance(SureidModel.from_pretrained(tmp_path / "teacher"), SureidTeacherModel)
