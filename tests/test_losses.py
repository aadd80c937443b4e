"""Each loss against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sureid.losses import (
    cross_entropy_label_smooth,
    feature_alignment_loss,
    interpolate_feature,
    kd_kl_loss,
    npkd_loss,
    ratio_loss,
    token_guidance_loss,
    triplet_loss,
)

LN3 = math.log(3.0)


def test_cross_entropy_label_smooth_by_hand():
    # logits (ln 3, 0) -> p = (0.75, 0.25)
    logits, labels = torch.tensor([[LN3, 0.0]]), torch.tensor([0])
    assert float(cross_entropy_label_smooth(logits, labels, 0.0)) == pytest.approx(
        0.287682, abs=1e-5
    )
    # eps 0.2 -> targets (0.9, 0.1): -(0.9 ln .75 + 0.1 ln .25)
    assert float(cross_entropy_label_smooth(logits, labels, 0.2)) == pytest.approx(
        0.397543, abs=1e-5
    )
    # equal logits: any smoothing gives ln 2
    uniform = torch.zeros(2, 2)
    got = cross_entropy_label_smooth(uniform, torch.tensor([0, 1]), 0.1)
    assert float(got) == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        cross_entropy_label_smooth(logits, labels, 1.0)


def test_batch_hard_triplet_by_hand():
    # 1-D points: id 0 at 0 and 1, id 1 at 3 and 5.
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # hardest (d_ap, d_an): (1, 3), (1, 2), (2, 2), (2, 4) -> relu(. + 0.3) = 0, 0, 0.3, 0
    assert float(triplet_loss(feats, labels, margin=0.3)) == pytest.approx(0.075, abs=1e-5)
    # soft margin: mean softplus(-2, -1, 0, -2)
    assert float(triplet_loss(feats, labels, margin=None)) == pytest.approx(0.315066, abs=1e-5)
    # no positives at all -> 0, still differentiable
    lonely = torch.tensor([[0.0], [1.0]], requires_grad=True)
    loss = triplet_loss(lonely, torch.tensor([0, 1]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and lonely.grad is not None


def test_interpolation_and_feature_alignment_by_hand():
    assert interpolate_feature(torch.tensor([[0.0, 3.0]]), 4).tolist() == [[0.0, 1.0, 2.0, 3.0]]
    f_s, f_t = torch.tensor([[0.0, 1.0, 2.0, 4.0]]), torch.tensor([[0.0, 3.0]])
    # t2s: teacher -> (0, 1, 2, 3); squared diff (0, 0, 0, 1), mean 0.25
    assert float(feature_alignment_loss(f_s, f_t, "t2s-interp")) == pytest.approx(0.25)
    # s2t: student (0, 1, 2, 4) -> width 2 with align_corners: (0, 4); diff (0, 1), mean 0.5
    assert float(feature_alignment_loss(f_s, f_t, "s2t-interp")) == pytest.approx(0.5)
    proj = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0 / 3], [0.0, 2.0 / 3], [0.0, 1.0]]))
    assert float(feature_alignment_loss(f_s, f_t, "t2s-linear", proj).detach()) == pytest.approx(
        0.25
    )
    with pytest.raises(ValueError, match="projection"):
        feature_alignment_loss(f_s, f_t, "s2t-linear")
    with pytest.raises(ValueError, match="align"):
        feature_alignment_loss(f_s, f_t, "cubic")


def test_feature_term_is_the_channel_mean_averaged_over_the_batch():
    """Eq. (13)'s ||f_s - I(f_t)||^2 read as the mean over the channels, then over the images."""
    f_s = torch.tensor([[0.0, 1.0, 2.0, 4.0], [2.0, 1.0, 2.0, 3.0]])
    f_t = torch.tensor([[0.0, 3.0], [0.0, 3.0]])  # interpolated: (0, 1, 2, 3)
    # squared differences (0, 0, 0, 1) and (4, 0, 0, 0): channel means 0.25 and 1, mean 0.625
    assert float(feature_alignment_loss(f_s, f_t)) == pytest.approx(0.625)
    kd = npkd_loss(f_s, f_t, torch.zeros(2, 3), torch.zeros(2, 3))  # equal logits: KL 0
    assert float(kd["kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(kd["feat"]) == pytest.approx(0.625) and float(kd["kd"]) == pytest.approx(0.625)
    # the retired "sum" reduction is no option any more: an old call fails loudly
    with pytest.raises(TypeError, match="reduction"):
        feature_alignment_loss(f_s, f_t, reduction="sum")
    with pytest.raises(TypeError, match="feature_reduction"):
        npkd_loss(f_s, f_t, torch.zeros(2, 3), torch.zeros(2, 3), feature_reduction="sum")


def test_kl_by_hand():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])
    # KL(p_t || p_s), p_t = (.75, .25), p_s = (.5, .5): .75 ln 1.5 + .25 ln .5
    assert float(kd_kl_loss(student, teacher, 1.0)) == pytest.approx(0.130812, abs=1e-5)
    # T = 2: p_t = (0.633975, 0.366025); KL * T^2
    assert float(kd_kl_loss(student, teacher, 2.0)) == pytest.approx(0.145340, abs=1e-4)
    assert float(kd_kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="num_identities"):
        kd_kl_loss(torch.zeros(1, 3), torch.zeros(1, 2))


def test_npkd_combines_terms_and_detaches_the_teacher():
    f_s = torch.tensor([[0.0, 1.0, 2.0, 4.0]], requires_grad=True)
    f_t = torch.tensor([[0.0, 3.0]], requires_grad=True)
    g_s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    g_t = torch.tensor([[LN3, 0.0]], requires_grad=True)
    out = npkd_loss(f_s, f_t, g_s, g_t, lambda_kl=0.1)
    assert float(out["kd"].detach()) == pytest.approx(0.1 * 0.130812 + 0.25, abs=1e-5)
    out["kd"].backward()
    assert f_s.grad is not None and g_s.grad is not None
    assert f_t.grad is None and g_t.grad is None


def test_ratio_loss_by_hand():
    masks = [
        torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]]),
        torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]),
    ]
    # b0: (0.5-0.5)^2 + (0.25-0.25)^2 = 0; b1: (0.5-1)^2 + (0.25-0)^2 = 0.3125; mean 0.15625
    assert float(ratio_loss(masks, [0.5, 0.25])) == pytest.approx(0.15625)
    with pytest.raises(ValueError, match="targets"):
        ratio_loss(masks, [0.5])


def test_token_guidance_loss_by_hand():
    # Two images, four tokens, importance (0.4, 0.3, 0.2, 0.1), keep counts (2, 1).
    importance = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2, requires_grad=True)
    # Stage 1: every token alive, targets = top 2 = (1, 1, 0, 0) for both images.
    # Logits (0, ln 3, -ln 3, 0): BCE ln 2, ln(4/3), ln(4/3), ln 2 -> mean ln(8/3) / 2.
    stage1 = torch.tensor([[0.0, LN3, -LN3, 0.0]] * 2, requires_grad=True)
    # After stage 1 image 0 kept tokens 0 and 2, image 1 tokens 2 and 3 (not the top 2: the
    # sampled decisions). Stage 2's target: the top 1 among the alive tokens.
    masks = [
        torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]]),
        torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]]),
    ]
    # Dead tokens' logits (5, -7 / 5, 5) must not count.
    stage2 = torch.tensor([[LN3, 5.0, LN3, -7.0], [5.0, 5.0, LN3, -LN3]], requires_grad=True)
    # Image 0: alive {0, 2}, target token 0 (0.4): ln(4/3) (t=1, ln 3) + ln 4 (t=0, ln 3), /2.
    # Image 1: alive {2, 3}, target token 2 (0.2): ln(4/3) (t=1, ln 3) + ln(4/3) (t=0, -ln 3), /2.
    image0 = (math.log(8 / 3) / 2 + (math.log(4 / 3) + math.log(4)) / 2) / 2
    image1 = (math.log(8 / 3) / 2 + math.log(4 / 3)) / 2
    loss = token_guidance_loss([stage1, stage2], masks, importance, [2, 1])
    assert float(loss.detach()) == pytest.approx((image0 + image1) / 2, abs=1e-6)
    loss.backward()
    assert importance.grad is None  # the guide is a target, not trained
    assert stage2.grad[0, 1] == 0 and stage2.grad[0, 3] == 0 and stage2.grad[1, :2].abs().sum() == 0
    assert stage1.grad.abs().min() > 0 and stage2.grad[0, 0] < 0 and stage2.grad[1, 3] > 0
    # The last stage's mask is never read: any value gives the same loss.
    again = token_guidance_loss([stage1, stage2], [masks[0], torch.zeros(2, 4)], importance, [2, 1])
    assert float(again.detach()) == pytest.approx(float(loss.detach()))


def test_token_guidance_loss_refuses_mismatched_inputs():
    logits, masks = [torch.zeros(1, 4)] * 2, [torch.ones(1, 4)] * 2
    with pytest.raises(
        ValueError, match="one keep logit, mask and count per stage, got 2, 2 and 1"
    ):
        token_guidance_loss(logits, masks, torch.rand(1, 4), [2])
    with pytest.raises(ValueError, match="got 2, 1 and 2"):
        token_guidance_loss(logits, masks[:1], torch.rand(1, 4), [2, 1])
    with pytest.raises(ValueError, match="got 0, 0 and 0"):
        token_guidance_loss([], [], torch.rand(1, 4), [])
    with pytest.raises(
        ValueError, match=r"importance \(1, 3\) must match the keep logits \(1, 4\)"
    ):
        token_guidance_loss(logits, masks, torch.rand(1, 3), [2, 1])
