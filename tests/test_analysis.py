"""``sureid.analysis``: the importance maps, the rank and AUC measures, the patch flags, the
decisions it runs the student with, and the token-selection check, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sureid import (
    SureidError,
    SureidImageProcessor,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
)
from sureid.analysis import (
    attention_rollout,
    auc_rows,
    check_token_selection,
    class_attention,
    patch_body_flags,
    patch_mask_flags,
    resample_importance,
    score_decisions,
    spearman_rows,
    token_importance,
)
from sureid.evaluation import evaluate_model, evaluate_splits

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Importance maps
# --------------------------------------------------------------------------------------------


def test_attention_rollout_by_hand():
    # One prefix token (the class token) and two image tokens; block 2 gives the class row only.
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    a2 = torch.tensor([[0.2, 0.5, 0.3]])
    # 0.5 A1 + 0.5 I = [[.75, .125, .125], [.1, .8, .1], [.05, .05, .9]]
    # class row of 0.5 A2 + 0.5 I = [.6, .25, .15]
    # [.6, .25, .15] @ (0.5 A1 + 0.5 I) = [.4825, .2825, .235]
    got = attention_rollout([a1[None], a2[None]], num_prefix=1)
    torch.testing.assert_close(got, torch.tensor([[0.2825, 0.235]]), atol=1e-6, rtol=0)
    # One block: the class row of 0.5 A + 0.5 I; two prefix tokens leave one image token.
    torch.testing.assert_close(
        attention_rollout([a1[None]], num_prefix=1), torch.tensor([[0.125, 0.125]])
    )
    torch.testing.assert_close(attention_rollout([a1[None]], num_prefix=2), torch.tensor([[0.125]]))
    # Batched: each image its own product.
    flipped = a1.flip(-1)[None]
    both = attention_rollout([torch.cat([a1[None], flipped]), torch.cat([a2[None], a2[None]])], 1)
    torch.testing.assert_close(both[1], attention_rollout([flipped, a2[None]], 1)[0])
    assert not torch.allclose(both[0], both[1])


def test_class_attention_by_hand(tiny_teacher_config, pixels):
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    a2 = torch.tensor([[0.2, 0.5, 0.3]])
    # the class rows over the image tokens, [.25, .25] and [.5, .3], averaged
    got = class_attention([a1[None], a2[None]], num_prefix=1)
    torch.testing.assert_close(got, torch.tensor([[0.375, 0.275]]))
    # through a model: "cls-attention" differs from the rollout of the same attention
    teacher = SureidTeacherModel(tiny_teacher_config)
    cls_attention = token_importance(teacher, pixels, "cls-attention")
    assert cls_attention.shape == (3, tiny_teacher_config.num_patches)
    assert not torch.allclose(cls_attention, token_importance(teacher, pixels, "rollout"))


def test_attention_norm_weights_each_key_by_what_it_adds(tiny_teacher_config, pixels):
    """ "attention-norm": a_0j * ||W_O^h v_j^h||, averaged over heads, then over blocks."""
    teacher = SureidTeacherModel(tiny_teacher_config).eval()
    p = tiny_teacher_config.num_prefix_tokens
    expected = []
    with torch.no_grad():
        x = teacher.encoder.embed(pixels)
        for block in teacher.encoder.blocks:
            attn = block.attn
            h = block.norm1(x)
            b, n, c = h.shape
            qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
            weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0]  # [B, H, N]
            norms = torch.stack(
                [
                    (
                        v[:, i] @ attn.proj.weight[:, i * attn.head_dim : (i + 1) * attn.head_dim].T
                    ).norm(dim=-1)
                    for i in range(attn.num_heads)
                ],
                dim=1,
            )  # [B, H, N]
            expected.append((weights * norms).mean(dim=1)[:, p:])
            x = block(x)
        got = token_importance(teacher, pixels, "attention-norm")
    torch.testing.assert_close(got, torch.stack(expected).mean(dim=0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, token_importance(teacher, pixels, "cls-attention"))


def test_token_importance_runs_in_eval_mode_and_refuses_an_unknown_method(pixels):
    """Drop path (rate 0.5) would make a training-mode pass random: the importance is the
    eval-mode one, every time, and the model's mode comes back."""
    config = SureidStudentConfig(
        **{**TINY, "drop_path_rate": 0.5}, sparsify_layers=(1, 3, 5), keep_rate=0.7
    )
    torch.manual_seed(0)
    model = SureidStudentModel(config).train()
    first = token_importance(model, pixels, "rollout")
    second = token_importance(model, pixels, "rollout")
    assert model.training
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    model.eval()
    torch.testing.assert_close(first, token_importance(model, pixels, "rollout"), atol=0, rtol=0)
    assert not model.training
    with pytest.raises(ValueError, match="unknown token importance 'gradcam'"):
        token_importance(model, pixels, "gradcam")


def test_resample_importance_by_hand():
    importance = torch.tensor([[1.0, 3.0]])
    assert resample_importance(importance, (2, 1), [2, 1]) is importance  # same grid: as is
    # Bilinear, half-pixel centres: rows 0..3 sample source rows -0.25, 0.25, 0.75, 1.25
    # (clamped at the borders).
    expected = torch.tensor([[1.0, 1.5, 2.5, 3.0]])
    torch.testing.assert_close(resample_importance(importance, (2, 1), (4, 1)), expected)
    torch.testing.assert_close(resample_importance(importance, (1, 2), (1, 4)), expected)
    constant = torch.full((2, 8 * 4), 0.25)
    torch.testing.assert_close(
        resample_importance(constant, (8, 4), (10, 5)), torch.full((2, 50), 0.25)
    )


# --------------------------------------------------------------------------------------------
# Rank correlation, AUC and patch flags
# --------------------------------------------------------------------------------------------


def test_spearman_rows_by_hand():
    a = torch.tensor([[1.0, 2, 3, 4]] * 3)
    b = torch.tensor([[10.0, 20, 30, 40], [4.0, 3, 2, 1], [1.0, 3, 2, 4]])
    # Row 3: one adjacent swap, sum d^2 = 2: 1 - 6 * 2 / (4 * (16 - 1)) = 0.8.
    torch.testing.assert_close(spearman_rows(a, b), torch.tensor([1.0, -1.0, 0.8]))
    # Only the ranks count: a monotone transform of either side changes nothing.
    torch.testing.assert_close(spearman_rows(a.exp(), b * 3 - 1), torch.tensor([1.0, -1.0, 0.8]))


def test_auc_rows_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8], [0.5, 0.5, 0.5, 0.1]])
    labels = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # Row 1: both positives above both negatives; row 2: below; row 3: the positive (0.5)
    # ties two negatives (1/2 each) and beats the third: (0.5 + 0.5 + 1) / 3.
    torch.testing.assert_close(auc_rows(scores, labels), torch.tensor([1.0, 0.0, 2.0 / 3.0]))
    # A row with one kind of label only has no AUC.
    one_kind = auc_rows(torch.rand(2, 5), torch.tensor([[1] * 5, [0] * 5], dtype=torch.bool))
    assert one_kind.isnan().all()


def _auc_by_loops(scores, flags) -> float:
    pos = [float(v) for v, f in zip(scores, flags, strict=True) if f]
    neg = [float(v) for v, f in zip(scores, flags, strict=True) if not f]
    if not pos or not neg:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_patch_body_flags_by_hand(tmp_path):
    from PIL import Image

    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))  # 64x32, patch 8: 8 x 4 grid
    mask = np.zeros((64, 32), dtype=bool)
    mask[0:16, 0:8] = True  # patches (0, 0) and (1, 0): all body
    mask[16:20, 8:16] = True  # patch (2, 1): 32 of 64 pixels ...
    mask[20, 8] = True  # ... plus one: over half
    mask[24:28, 8:16] = True  # patch (3, 1): exactly half, not over
    mask[32:36, 16:24] = True  # patch (4, 2): one pixel short of half
    mask[35, 23] = False
    expected = torch.zeros(32, dtype=torch.bool)
    expected[[0 * 4 + 0, 1 * 4 + 0, 2 * 4 + 1]] = True
    assert torch.equal(patch_body_flags(mask, config), expected)
    # The same mask at twice the size, as a PIL image or a PNG path, is resized to the input.
    big = np.kron(mask, np.ones((2, 2), dtype=bool))
    image = Image.fromarray(big)
    image.save(tmp_path / "mask.png")
    assert torch.equal(patch_body_flags(image, config), expected)
    assert torch.equal(patch_body_flags(tmp_path / "mask.png", config), expected)
    assert torch.equal(patch_body_flags(str(tmp_path / "mask.png"), config), expected)
    # Overlapping patches (stride 6): one flag per patch of the 10 x 5 grid.
    overlapping = SureidStudentConfig(**{**TINY, "stride_size": 6}, sparsify_layers=(1, 3, 5))
    assert patch_body_flags(mask, overlapping).shape == (overlapping.num_patches,) == (50,)


def test_patch_mask_flags_by_hand():
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))  # 64x32, patch 8: 8 x 4 grid
    masks = torch.zeros(2, 64, 32, dtype=torch.bool)
    masks[0, 0:8, 0:8] = True  # image 0: patch (0, 0), all of it
    masks[1, 8:12, 24:32] = True  # image 1: patch (1, 3), 32 of 64 pixels ...
    masks[1, 12, 24] = True  # ... plus one: over half
    masks[1, 56:60, 0:8] = True  # patch (7, 0): exactly half, not over
    expected = torch.zeros(2, 32, dtype=torch.bool)
    expected[0, 0] = expected[1, 1 * 4 + 3] = True
    assert torch.equal(patch_mask_flags(masks, config), expected)
    # 0/1 floats as bools; one row per mask, in order.
    assert torch.equal(patch_mask_flags(masks.float(), config), expected)
    # non-zero = in the mask, whatever its values (e.g. 0/255 PNG masks)
    assert torch.equal(patch_mask_flags(masks.float() * 255, config), expected)
    assert torch.equal(patch_mask_flags(masks.flip(0), config), expected.flip(0))


# --------------------------------------------------------------------------------------------
# The token-selection check
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_splits(tiny_synthetic):
    from sureid.data import load_reid_dataset

    return load_reid_dataset("synthetic", tiny_synthetic)


def test_check_token_selection_on_a_tiny_student(tiny_splits):
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    student = SureidStudentModel(config).eval()
    query, gallery = tiny_splits["query"], tiny_splits["gallery"]
    check = check_token_selection(student, query, gallery, protocol="market", device="cpu")
    # The predictor's numbers are the student's own (true dropping), as evaluate_model gives.
    expected = evaluate_model(student, query, gallery, "market", device="cpu", progress=False)
    assert check.predictor.rank(1) == pytest.approx(expected.metrics.rank(1), abs=1e-6)
    assert check.predictor.mAP == pytest.approx(expected.metrics.mAP, abs=1e-6)
    assert check.random.num_query == len(query) and check.random.num_gallery == len(gallery)
    assert check.guide is None and check.spearman is None
    summary = check.summary()
    assert summary["guide_R1"] is None and summary["guide_mAP"] is None
    assert summary["predictor_mAP"] == check.predictor.mAP and summary["random_R1"] is not None
    # Body shares from the synthetic set's masks, by hand: the patches that are mostly body,
    # over all patches (chance) and over the last stage's kept patches.
    flags = [patch_body_flags(path, config) for path in query["body_mask_path"]]
    pixels = SureidImageProcessor.from_model_config(config)(query["image"], return_tensors="pt")
    with torch.no_grad():
        kept = (
            student.forward_masked(pixels["pixel_values"], decide=student.keep_topk).keep_masks[-1]
            > 0
        )
    chance = np.mean([float(f.float().mean()) for f in flags])
    share = np.mean([float(f[k].float().mean()) for f, k in zip(flags, kept, strict=True)])
    assert 0 < chance < 1 and 0 <= share <= 1
    assert check.body_chance == pytest.approx(chance, abs=1e-6)
    assert check.body_share == pytest.approx(share, abs=1e-6)
    # ... and after each stage (3 stages: the last is the body share above).
    with torch.no_grad():
        masks = student.forward_masked(pixels["pixel_values"], decide=student.keep_topk).keep_masks
    by_stage = [
        np.mean([float(f[m > 0].float().mean()) for f, m in zip(flags, mask, strict=True)])
        for mask in masks
    ]
    assert check.body_share_by_stage == pytest.approx(by_stage, abs=1e-6) and len(by_stage) == 3
    assert check.body_share_by_stage[-1] == pytest.approx(check.body_share, abs=1e-9)
    assert summary["body_share_stage1"] == check.body_share_by_stage[0]
    # Body AUC of the stage-1 keep score, pair by pair, over the queries that have both kinds.
    with torch.no_grad():
        stage1 = student.forward_masked(
            pixels["pixel_values"], decide=student.keep_topk
        ).keep_logits[0]
    aucs = [_auc_by_loops(s, f) for s, f in zip(stage1, flags, strict=True)]
    assert check.body_auc == pytest.approx(np.nanmean(aucs), abs=1e-6)
    assert check.guide_body_auc is None
    # Random keeping: the mean over 5 seeded draws (CMC, mAP), each draw kept.
    assert len(check.random_draws) == 5
    assert check.random.mAP == pytest.approx(np.mean([d.mAP for d in check.random_draws]))
    assert check.random.rank(1) == pytest.approx(np.mean([d.rank(1) for d in check.random_draws]))
    assert summary["random_R1_min"] == min(d.rank(1) for d in check.random_draws)
    assert summary["random_R1_max"] == max(d.rank(1) for d in check.random_draws)
    single = check_token_selection(student, query, gallery, device="cpu", random_draws=1)
    assert len(single.random_draws) == 1 and single.random is single.random_draws[0]
    with pytest.raises(ValueError, match="random_draws must be at least 1, got 0"):
        check_token_selection(student, query, gallery, device="cpu", random_draws=0)

    # With a guide: its oracle metrics and the rank correlation; the predictor's numbers and
    # the seeded random keeping do not change; the models' training modes come back.
    torch.manual_seed(1)
    guide = SureidTeacherModel(SureidTeacherConfig(**TINY))
    student.train()
    guided = check_token_selection(student, query, gallery, guide, device="cpu")
    assert student.training and guide.training  # both modes restored
    assert guided.guide is not None and guided.guide.num_query == len(query)
    assert isinstance(guided.spearman, float) and -1.0 <= guided.spearman <= 1.0
    assert guided.predictor.mAP == pytest.approx(check.predictor.mAP, abs=1e-6)
    assert guided.random.mAP == pytest.approx(check.random.mAP, abs=1e-6)
    assert guided.summary()["guide_mAP"] == guided.guide.mAP
    # The guide's own body AUC: its rollout over the same patches.
    with torch.no_grad():
        rollout = token_importance(guide, pixels["pixel_values"], "rollout")
    guide_aucs = [_auc_by_loops(r, f) for r, f in zip(rollout, flags, strict=True)]
    assert guided.guide_body_auc == pytest.approx(np.nanmean(guide_aucs), abs=1e-6)
    assert guided.body_auc == pytest.approx(check.body_auc, abs=1e-6)
    # The Spearman against the guide's attention-norm too (the default other importance).
    with torch.no_grad():
        norm = token_importance(guide, pixels["pixel_values"], "attention-norm")
    expected_rho = float(spearman_rows(stage1, norm).mean())
    assert guided.other_spearman["attention-norm"] == pytest.approx(expected_rho, abs=1e-6)
    assert guided.summary()["spearman_attention_norm"] == guided.other_spearman["attention-norm"]
    assert check.other_spearman == {} and "spearman_attention_norm" not in summary
    with pytest.raises(ValueError, match="unknown token importance \\['gradcam'\\]"):
        check_token_selection(
            student, query, gallery, guide, device="cpu", other_importances=("gradcam",)
        )

    with pytest.raises(ValueError, match="1 body masks for 4 query images"):
        check_token_selection(student, query, gallery, body_masks=["x.png"], device="cpu")
    dense = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3), keep_rate=1.0))
    with pytest.raises(SureidError, match="needs an HTS student"):
        check_token_selection(dense, query, gallery, device="cpu")


def test_check_token_selection_measures_how_close_training_is_to_inference(
    tiny_splits, monkeypatch
):
    """``sampling_overlap``: the share of the inference top-k that a draw of the training
    sampling keeps too. Exact-k training decisions keep exactly k (chance k / N); training
    decisions that were the inference decisions themselves would keep all of the top-k; the
    draw does not move the check's other draws."""
    torch.manual_seed(0)
    student = SureidStudentModel(
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    ).eval()
    query, gallery = tiny_splits["query"], tiny_splits["gallery"]
    n = student.config.num_patches
    k = student.config.stage_keep_counts[-1]
    checks = {}
    for sampling in ("gumbel", "gumbel-topk"):
        student.config.hts_sampling = sampling
        checks[sampling] = check_token_selection(
            student, query, gallery, device="cpu", random_draws=2
        )
    student.config.hts_sampling = "gumbel"
    with monkeypatch.context() as patched:  # the eval path's decisions in place of training's
        patched.setattr(student, "sample_decisions", student.keep_topk)
        checks["topk"] = check_token_selection(
            student, query, gallery, device="cpu", random_draws=2
        )
    paper = checks["gumbel"]
    assert 0.0 <= paper.sampling_overlap <= 1.0 and 0.0 < paper.sampling_overlap_chance < 1.0
    assert paper.summary()["sampling_overlap"] == paper.sampling_overlap
    assert checks["gumbel-topk"].sampling_overlap_chance == pytest.approx(k / n)
    assert checks["topk"].sampling_overlap == pytest.approx(1.0)
    assert checks["topk"].sampling_overlap_chance == pytest.approx(k / n)
    for other in checks.values():  # random keeping drew the same tokens every time
        assert other.random.mAP == pytest.approx(paper.random.mAP, abs=1e-9)
    again = check_token_selection(student, query, gallery, device="cpu", random_draws=2)
    assert again.sampling_overlap == pytest.approx(paper.sampling_overlap)
    # one batch by hand: the same draw (same seed) of the training sampling against the top-k
    from sureid.analysis.selection import _SelectionTally

    pixels = SureidImageProcessor.from_model_config(student.config)(
        query["image"], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        topk = student.forward_masked(pixels, decide=student.keep_topk).keep_masks[-1] > 0
        tally = _SelectionTally(student, None, "rollout", None)
        torch.manual_seed(5)
        tally._add_sampling_overlap(pixels, topk)
        torch.manual_seed(5)
        sampled = student.forward_masked(pixels).keep_masks[-1] > 0  # training's sampling
    assert not torch.equal(sampled, topk)  # a real draw, not the top-k again
    overlap = (sampled & topk).float().sum(1) / topk.float().sum(1)
    assert torch.allclose(tally.sampling_overlap[0], overlap)
    assert torch.allclose(tally.sampling_chance[0], sampled.float().sum(1) / n)


def test_check_token_selection_measures_the_occluder(tiny_splits):
    """With the synthetic set's occluder masks: the last stage's share of occluder patches, and
    R1 / mAP of the stage-1 ranking held fixed, without and with the occluder put last, all by
    hand; without occluder masks the measures are absent."""
    torch.manual_seed(0)
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    student = SureidStudentModel(config).eval()
    query, gallery = tiny_splits["query"], tiny_splits["gallery"]
    check = check_token_selection(student, query, gallery, device="cpu", random_draws=1)
    processor = SureidImageProcessor.from_model_config(config)

    def by_hand(split, occluder_first: bool):
        """Embeddings with the stage-1 ranking (occluder last unless ``occluder_first``), and
        the split's occluder flags."""
        pixels = processor(split["image"], return_tensors="pt")["pixel_values"]
        flags = torch.stack([patch_body_flags(p, config) for p in split["occluder_mask_path"]])
        with torch.no_grad():
            masked = student.forward_masked(pixels, decide=student.keep_topk)
            stage1 = masked.keep_logits[0]
            ranks = stage1.argsort(dim=-1).argsort(dim=-1).float()
            scores = ranks if occluder_first else ranks - config.num_patches * flags.float()
            out = student.forward_masked(pixels, decide=score_decisions(student, scores))
        return F.normalize(out.embeddings, dim=1), flags, masked.keep_masks[-1] > 0

    for name, occluder_first in (("stage1_ranking", True), ("occluder_dropped", False)):
        q, q_flags, kept = by_hand(query, occluder_first)
        g, _, _ = by_hand(gallery, occluder_first)
        expected = evaluate_splits(q, g, query, gallery, "market")
        metrics = getattr(check, name)
        assert metrics.rank(1) == pytest.approx(expected.rank(1), abs=1e-6)
        assert metrics.mAP == pytest.approx(expected.mAP, abs=1e-6)
        assert check.summary()[f"{name}_mAP"] == metrics.mAP
    assert q_flags.any()  # every query is occluded
    share = np.mean([float(f[k].float().mean()) for f, k in zip(q_flags, kept, strict=True)])
    chance = np.mean([float(f.float().mean()) for f in q_flags])
    assert check.occluder_share == pytest.approx(share, abs=1e-6)
    assert check.occluder_chance == pytest.approx(chance, abs=1e-6) and 0 < chance < 1
    # Blank occluder masks: nothing to drop, so both rankings score the same, and no share.
    blank = {
        name: [np.zeros((64, 32), dtype=bool)] * len(split)
        for name, split in (("query", query), ("gallery", gallery))
    }
    none = check_token_selection(
        student, query, gallery, device="cpu", random_draws=1, occluder_masks=blank
    )
    assert none.occluder_share == 0.0 and none.occluder_chance == 0.0
    assert none.occluder_dropped.mAP == pytest.approx(none.stage1_ranking.mAP, abs=1e-9)
    assert none.stage1_ranking.mAP == pytest.approx(check.stage1_ranking.mAP, abs=1e-6)
    skipped = check_token_selection(
        student, query, gallery, device="cpu", random_draws=1, occluder_masks=None
    )
    assert skipped.occluder_share is None and skipped.occluder_dropped is None
    assert skipped.summary()["occluder_dropped_R1"] is None
    assert skipped.predictor.mAP == pytest.approx(check.predictor.mAP, abs=1e-6)
    with pytest.raises(ValueError, match="one mask per gallery image: 1 masks for"):
        check_token_selection(
            student,
            query,
            gallery,
            device="cpu",
            occluder_masks={"query": blank["query"], "gallery": blank["gallery"][:1]},
        )
    with pytest.raises(ValueError, match='occluder_masks must be "auto", None or a mapping'):
        check_token_selection(student, query, gallery, device="cpu", occluder_masks="yes")
