"""Teacher / student forward passes, the two HTS paths, masked attention, save/load, AutoModel,
the checkpoint hooks."""

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
    analysis,
    modeling_sureid,
)
from sureid.modeling_sureid import (
    Block,
    init_from_pretrained,
    masked_softmax,
    register_checkpoint_hooks,
)

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


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
        dropped = model.eval()(x)
        masked = model.forward_masked(x, decide=model.keep_topk)
    assert dropped.kept_indices is not None and masked.keep_masks is not None
    torch.testing.assert_close(dropped.features, masked.features, atol=1e-5, rtol=0)
    # Same decisions: the masked path's final mask marks exactly the dropped path's final tokens.
    final = torch.zeros_like(masked.keep_masks[-1]).scatter(1, dropped.kept_indices[-1], 1.0)
    assert torch.equal(final, masked.keep_masks[-1])


def test_random_decisions_keep_the_same_counts_as_topk(tiny_student_config, pixels):
    model = _student(tiny_student_config).eval()
    torch.manual_seed(0)
    topk = model.forward_masked(pixels, decide=model.keep_topk).keep_masks
    random = model.forward_masked(pixels, decide=analysis.random_decisions(model)).keep_masks
    for a, b in zip(topk, random):
        torch.testing.assert_close(a.sum(dim=1), b.sum(dim=1))
    assert any(not torch.equal(a, b) for a, b in zip(topk, random))
    for earlier, later in zip(random, random[1:]):
        assert bool((later <= earlier).all())  # a dropped token stays dropped


@pytest.mark.parametrize("sampling", ["gumbel-topk", "gumbel"])
def test_training_masks_are_binary_monotone_and_differentiable(
    tiny_student_config, pixels, sampling
):
    tiny_student_config.hts_sampling = sampling
    model = _student(tiny_student_config).train()
    out = model(pixels, labels=torch.tensor([0, 1, 2]))
    assert len(out.keep_masks) == 3 and len(out.keep_probs) == 3
    for j, mask in enumerate(out.keep_masks):
        assert mask.shape == (3, tiny_student_config.num_patches)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        if sampling == "gumbel-topk":  # exactly the stage's k tokens per image, as inference
            k = tiny_student_config.stage_keep_counts[j]
            assert mask.sum(dim=1).tolist() == [k] * 3
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
    tiny_student_config.hts_sampling = "gumbel"  # only per-token sampling can drop them all
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
    assert float(model.cls_reweight_lambda.detach()) == pytest.approx(0.5)
    torch.manual_seed(3)
    model.train()
    with_reweight = model.forward_masked(pixels, decide=model.keep_topk).features
    with torch.no_grad():
        model.cls_reweight_lambda.zero_()
    without = model.forward_masked(pixels, decide=model.keep_topk).features
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


def test_the_removed_hts_decisions_argument_names_forward_masked(tiny_student_config, pixels):
    model = _student(tiny_student_config)
    for training, decisions in ((False, "topk"), (True, "random"), (False, None)):
        model.train(training)
        with pytest.raises(SureidError, match=r"hts_decisions was removed: .*forward_masked"):
            model(pixels, hts_decisions=decisions)


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


def test_checkpoint_hooks_run_in_from_pretrained_and_save_pretrained(
    tmp_path, tiny_teacher_config, pixels
):
    import sureid
    from sureid import zoo

    # Importing sureid registers the zoo's resolver and suggester and the default model card
    # (a thin wrapper, so the card module loads only when a model is saved).
    assert zoo.resolve_zoo_id in modeling_sureid._NAME_RESOLVERS
    assert zoo.suggest_zoo_ids in modeling_sureid._NAME_SUGGESTERS
    assert sureid._default_card in modeling_sureid._SAVE_HOOKS

    folder = tmp_path / "ckpt"
    resolved, saved = [], []

    def resolve(name, kwargs):
        resolved.append(name)
        return (folder, kwargs) if name == "my-alias" else (name, kwargs)

    def on_save(model, directory):
        saved.append((model, str(directory), (folder / "model.safetensors").is_file()))

    register_checkpoint_hooks(resolve=resolve, on_save=on_save)
    register_checkpoint_hooks(resolve=resolve, on_save=on_save)  # the same hooks again: no-op
    try:
        assert modeling_sureid._NAME_RESOLVERS.count(resolve) == 1
        assert modeling_sureid._SAVE_HOOKS.count(on_save) == 1
        teacher = _perturbed(SureidTeacherModel(tiny_teacher_config)).eval()
        teacher.save_pretrained(folder)
        assert saved == [(teacher, str(folder), True)]  # once, after the weights were written
        assert (folder / "README.md").is_file()  # the default card's hook ran as well
        # SureidModel hands the resolved folder on to the class's loader, whose resolvers see
        # it again (and leave it as it is).
        for loader, names in (
            (SureidTeacherModel.from_pretrained, ["my-alias"]),
            (SureidModel.from_pretrained, ["my-alias", folder]),
        ):
            resolved.clear()
            loaded = loader("my-alias")
            assert resolved == names
            assert type(loaded) is SureidTeacherModel
            with torch.no_grad():
                assert torch.equal(loaded.eval()(pixels).features, teacher(pixels).features)
        assert saved == [(teacher, str(folder), True)]  # loading saves nothing
    finally:
        modeling_sureid._NAME_RESOLVERS.remove(resolve)
        modeling_sureid._SAVE_HOOKS.remove(on_save)
    teacher.save_pretrained(tmp_path / "again")
    assert len(saved) == 1  # unregistered: no longer called
    assert (tmp_path / "again" / "README.md").is_file()


# --------------------------------------------------------------------------------------------
# The teacher's attentions, token importance, and the student's other decisions
# --------------------------------------------------------------------------------------------


def _perturbed(model, seed=0):
    """Random, non-trivial weights everywhere (init leaves biases at 0 and BN at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _attention_by_hand(model, pixels) -> list[torch.Tensor]:
    """Each block's head-averaged attention weights from the qkv weights, every block in full,
    [B, N, N]."""
    weights = []
    with torch.no_grad():
        x = model.encoder.embed(pixels)
        for block in model.encoder.blocks:
            attn = block.attn
            b, n, _ = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
            q, k, _ = qkv.permute(2, 0, 3, 1, 4)
            weights.append(((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(1))
            x = block(x)
    return weights


def _rollout_by_hand(model, pixels):
    """Rollout of ``_attention_by_hand``'s weights."""
    rollout = None
    for weights in _attention_by_hand(model, pixels):
        step = 0.5 * weights + 0.5 * torch.eye(weights.shape[-1])
        rollout = step if rollout is None else step @ rollout
    return rollout[:, 0, model.config.num_prefix_tokens :]


def test_teacher_output_attentions_are_each_blocks_and_leave_the_embedding_alone(
    tiny_teacher_config, pixels
):
    teacher = _perturbed(SureidTeacherModel(tiny_teacher_config)).eval()
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        plain = teacher(pixels, labels=labels)  # fused SDPA
        with_attentions = teacher(pixels, labels=labels, output_attentions=True)  # explicit
    assert plain.attentions is None
    torch.testing.assert_close(with_attentions.embeddings, plain.embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_attentions.features, plain.features, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_attentions.loss, plain.loss, atol=1e-5, rtol=0)
    attentions = with_attentions.attentions
    n = tiny_teacher_config.num_patches + tiny_teacher_config.num_prefix_tokens
    depth = tiny_teacher_config.num_hidden_layers
    # One per block: [B, N, N], the last block's class-token row alone, [B, 1, N].
    assert isinstance(attentions, tuple) and len(attentions) == depth
    assert [tuple(a.shape) for a in attentions] == [(3, n, n)] * (depth - 1) + [(3, 1, n)]
    for attn in attentions:  # head-averaged softmax rows
        assert bool((attn >= 0).all())
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5, rtol=0)
    by_hand = _attention_by_hand(teacher, pixels)
    for got, expected in zip(attentions[:-1], by_hand[:-1], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(attentions[-1], by_hand[-1][:, :1], atol=1e-5, rtol=0)


def test_token_importance_reads_the_teachers_attentions(
    tiny_teacher_config, tiny_student_config, pixels
):
    """One definition: ``analysis.token_importance`` of a teacher is the reduction of the
    attentions its forward returns (what token guidance reads in the NPKD pass)."""
    teacher = _perturbed(SureidTeacherModel(tiny_teacher_config)).eval()
    p = tiny_teacher_config.num_prefix_tokens
    with torch.no_grad():
        attentions = teacher(pixels, output_attentions=True).attentions
    cls_attention = analysis.token_importance(teacher, pixels, "cls-attention")
    assert cls_attention.shape == (3, tiny_teacher_config.num_patches)
    torch.testing.assert_close(cls_attention, analysis.class_attention(attentions, p))
    rollout = analysis.token_importance(teacher, pixels, "rollout")
    torch.testing.assert_close(rollout, analysis.attention_rollout(attentions, p))
    torch.testing.assert_close(rollout, _rollout_by_hand(teacher, pixels), atol=1e-5, rtol=0)
    assert bool((rollout >= 0).all())
    assert bool((rollout.sum(dim=1) < 1).all())  # the class token keeps a share of the row
    assert not torch.allclose(rollout, cls_attention)
    # A student with the teacher's encoder, run densely, has the teacher's importance.
    student = _student(tiny_student_config).eval()
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    for method, expected in (("rollout", rollout), ("cls-attention", cls_attention)):
        got = analysis.token_importance(student, pixels, method)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_score_decisions_keep_the_top_k_of_the_given_scores(tiny_student_config, pixels):
    model = _student(tiny_student_config).eval()
    scores = torch.rand(
        3, tiny_student_config.num_patches, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        out = model.forward_masked(pixels, decide=analysis.score_decisions(model, scores))
    order = scores.argsort(dim=1, descending=True)
    # The same scores at every stage: the top k_j among stage j-1's kept tokens (the top
    # k_{j-1}) is the top k_j of all tokens.
    for mask, k in zip(out.keep_masks, tiny_student_config.stage_keep_counts, strict=True):
        expected = torch.zeros_like(mask).scatter(1, order[:, :k], 1.0)
        assert torch.equal(mask, expected)
    with torch.no_grad():
        decide = analysis.score_decisions(model, -scores)
        other = model.forward_masked(pixels, decide=decide).keep_masks[-1]
    assert not bool((other * out.keep_masks[-1]).any())  # 11 + 11 of 32 tokens: disjoint
    # keep_top_scores is the same choice, one stage at a time, among the tokens alive.
    alive = out.keep_masks[0]
    k = tiny_student_config.stage_keep_counts[1]
    assert torch.equal(model.keep_top_scores(1, scores, alive), out.keep_masks[1])
    assert torch.equal(model.keep_top_scores(1, -scores, alive) * (1 - alive), torch.zeros(3, 32))
    assert model.keep_top_scores(1, -scores, alive).sum(1).tolist() == [k] * 3
    with pytest.raises(SureidError, match=r"scores must be .*\[B, 32\], got \[3, 31\]"):
        analysis.score_decisions(model, scores[:, :31])


@pytest.mark.parametrize("training", [False, True])
def test_keeping_every_token_computes_the_dense_model(tiny_student_config, pixels, training):
    """Decisions that keep every token (the running mask as it is) give the dense ViT under the
    student's weights; the importance maps of a student are that dense pass's."""
    model = _perturbed(_student(tiny_student_config)).train(training)
    dense = SureidStudentModel(
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=1.0, num_identities=10)
    )
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("predictors.") for k in unexpected)
    dense.train(training)

    def keep_all(stage, keep_logit, keep_mask):
        return keep_mask

    with torch.no_grad():
        out = model.forward_masked(pixels, decide=keep_all)
        ref = dense(pixels)
    assert all(bool((mask == 1).all()) for mask in out.keep_masks)
    torch.testing.assert_close(out.features, ref.features, atol=1e-5, rtol=0)
    with torch.no_grad():  # the sparse student differs: keep_all really kept every token
        topk = model.forward_masked(pixels, decide=model.keep_topk)
        assert (topk.features - ref.features).abs().max() > 1e-4
    for method in ("rollout", "cls-attention"):
        torch.testing.assert_close(
            analysis.token_importance(model, pixels, method),
            analysis.token_importance(dense, pixels, method),
            atol=1e-6,
            rtol=0,
        )
    assert model.training == training and dense.training == training


def test_gumbel_topk_samples_exactly_k_with_a_straight_through_gradient(
    tiny_student_config, pixels
):
    assert tiny_student_config.hts_sampling == "gumbel"  # the default: the paper's
    tiny_student_config.hts_sampling = "gumbel-topk"
    model = _perturbed(_student(tiny_student_config)).train()
    counts = tiny_student_config.stage_keep_counts
    torch.manual_seed(0)
    out = model(pixels)
    for mask, k in zip(out.keep_masks, counts, strict=True):
        assert mask.sum(dim=1).tolist() == [k] * 3
        assert bool(((mask == 0) | (mask == 1)).all())  # exactly 0/1 in the forward
    for logit, prob in zip(out.keep_logits, out.keep_probs, strict=True):
        torch.testing.assert_close(torch.sigmoid(logit), prob)
    # A loss that rewards keeping token i pushes token i's keep logit up, and only its own
    # (the straight-through sigmoid is centred on a detached threshold).
    i = 5
    reward = -out.keep_masks[0][:, i].sum()
    (grad,) = torch.autograd.grad(reward, out.keep_logits[0], retain_graph=True)
    assert bool((-grad[:, i] > 0).all())
    others = torch.ones_like(grad, dtype=torch.bool)
    others[:, i] = False
    assert bool((grad[others] == 0).all())
    # ... and a small step of the weights on that loss (one image) raises the logit (eval
    # mode, so BatchNorm takes one image; forward_masked samples as training does).
    model.eval()
    one = pixels[:1]
    torch.manual_seed(1)
    first = model.forward_masked(one)
    before = float(first.keep_logits[0][0, i].detach())
    model.zero_grad()
    (-first.keep_masks[0][0, i]).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
        after = float(model.forward_masked(one).keep_logits[0][0, i])
    assert after > before
    # It samples: another seed keeps another set.
    torch.manual_seed(0)
    again = model.forward_masked(pixels).keep_masks[0]
    torch.manual_seed(7)
    other = model.forward_masked(pixels).keep_masks[0]
    assert torch.equal(again.sum(1), other.sum(1)) and not torch.equal(again, other)


def test_init_from_pretrained_copies_what_fits(tmp_path, tiny_student_config, tiny_teacher_config):
    teacher = _perturbed(SureidTeacherModel(tiny_teacher_config), seed=1)
    model = _student(tiny_student_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_pretrained(model, teacher)
    ours, theirs = model.state_dict(), teacher.state_dict()
    assert set(report["copied"]) == set(theirs)  # encoder and BNNeck (same identities)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert set(report["new"]) == set(ours) - set(theirs)
    assert {k.split(".")[0] for k in report["new"]} == {"predictors", "cls_reweight_lambda"}
    assert all(torch.equal(ours[k], before[k]) for k in report["new"])

    # A student with the same stages gives its predictors too; a classifier for 12 identities
    # does not fit 10 and stays new.
    config = SureidStudentConfig(
        **TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7, num_identities=12
    )
    source = _perturbed(SureidStudentModel(config), seed=2)
    model = _student(tiny_student_config)
    classifier = model.head.classifier.weight.clone()
    report = init_from_pretrained(model, source)
    assert report["new"] == ["head.classifier.weight"]
    assert torch.equal(model.head.classifier.weight, classifier)
    theirs = source.state_dict()
    assert all(
        torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if k in report["copied"]
    )
    assert any(k.startswith("predictors.") for k in report["copied"])

    # Predictors trained before other blocks do not fit these stages: they stay new.
    other_stages = SureidStudentConfig(**TINY, sparsify_layers=(2, 4, 5), keep_rate=0.7)
    model = _student(tiny_student_config)
    report_other = init_from_pretrained(model, _perturbed(SureidStudentModel(other_stages), 4))
    assert {k for k in report_other["new"] if k.startswith("predictors.")} == {
        k for k in model.state_dict() if k.startswith("predictors.")
    }

    # A checkpoint directory works as the source.
    source.save_pretrained(tmp_path / "ckpt")
    from_dir = _student(tiny_student_config, seed=3)
    assert init_from_pretrained(from_dir, str(tmp_path / "ckpt")) == report
    assert all(torch.equal(from_dir.state_dict()[k], theirs[k]) for k in report["copied"])

    # An encoder of another width does not fit: the error names a tensor, nothing is copied.
    narrow = SureidTeacherModel(SureidTeacherConfig(**{**TINY, "hidden_size": 32}))
    model = _student(tiny_student_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SureidError, match=r"encoder\.cls_token: \(1, 1, 32\) vs \(1, 1, 64\)"):
        init_from_pretrained(model, narrow)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
