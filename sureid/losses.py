"""Training losses: pure functions of tensors (no model, no data).

Identity cross-entropy with label smoothing, batch-hard triplet, NPKD (eq. 11-13) with the four
feature alignments of the paper's Table VI, the HTS ratio loss (eq. 9), and the token-guidance
loss that teaches the HTS predictors a teacher's token importance (beyond the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ALIGNMENTS = ("t2s-interp", "s2t-interp", "t2s-linear", "s2t-linear")


def cross_entropy_label_smooth(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1
) -> torch.Tensor:
    """Identity cross-entropy with label smoothing ``epsilon`` (0 = plain CE), mean over the batch.

    Target distribution: ``(1 - epsilon) * onehot + epsilon / num_classes`` (as in BoT/TransReID).
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    targets = torch.zeros_like(log_probs).scatter_(1, labels.unsqueeze(1), 1.0)
    targets = (1.0 - epsilon) * targets + epsilon / logits.shape[-1]
    return (-targets * log_probs).sum(dim=-1).mean()


def triplet_loss(
    features: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss on (pre-BN) features with Euclidean distance.

    For each anchor: the farthest positive and the nearest negative in the batch.
    ``margin`` a float: ``relu(d_ap - d_an + margin)``; ``margin=None``: soft margin
    ``log(1 + exp(d_ap - d_an))``. Anchors without a positive or a negative are left out
    (a batch with none left gives 0, attached to the graph).
    """
    x = features.float()
    dist = torch.cdist(x, x).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    valid = positive.any(1) & negative.any(1)
    if not bool(valid.any()):
        return x.sum() * 0.0
    d_ap = dist.masked_fill(~positive, float("-inf")).amax(dim=1)[valid]
    d_an = dist.masked_fill(~negative, float("inf")).amin(dim=1)[valid]
    if margin is None:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


def interpolate_feature(features: torch.Tensor, width: int) -> torch.Tensor:
    """Parameter-free 1-D linear interpolation of [B, C] features to [B, width] (the paper's I)."""
    if features.shape[-1] == width:
        return features
    return F.interpolate(
        features[:, None, :].float(), size=width, mode="linear", align_corners=True
    )[:, 0]


def kd_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Eq. (11)-(12): ``KL(softmax(g_t / T) || softmax(g_s / T)) * T^2``, mean over the batch.

    The teacher's distribution is the target (the usual reading of KD; the paper writes
    ``KL(sigma(g_s), sigma(g_t))`` without fixing the direction). ``T^2`` keeps gradients
    comparable across temperatures (Hinton et al.); at the paper's T = 1 it is 1.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: student and teacher must classify the same "
            "identities (same num_identities)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def feature_alignment_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    align: str = "t2s-interp",
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """``|| f_s - I(f_t) ||^2`` of eq. (13), averaged over the batch and the channels (our
    reading: the squared norm as the paper writes it is C times this, which would outweigh
    the other terms at C = 384; docs/method.md).

    ``align``: ``t2s-interp`` (default: teacher interpolated to the student width, no parameters),
    ``s2t-interp`` (student interpolated to the teacher width), ``t2s-linear`` / ``s2t-linear``
    (``projection`` maps teacher to student width, or student to teacher width; a learnable
    ``nn.Linear`` owned by the trainer).
    """
    f_s, f_t = student_features.float(), teacher_features.float()
    if align == "t2s-interp":
        a, b = f_s, interpolate_feature(f_t, f_s.shape[-1])
    elif align == "s2t-interp":
        a, b = interpolate_feature(f_s, f_t.shape[-1]), f_t
    elif align in ("t2s-linear", "s2t-linear"):
        if projection is None:
            raise ValueError(f"align={align!r} needs a projection module (nn.Linear)")
        if align == "t2s-linear":
            a, b = f_s, projection(f_t)
        else:
            a, b = projection(f_s), f_t
    else:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    return (a.float() - b.float()).pow(2).mean()


def npkd_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    lambda_kl: float = 0.1,
    temperature: float = 1.0,
    align: str = "t2s-interp",
    projection: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. (13): ``L_KD = lambda_kl * L_KL + || f_s - I(f_t) ||^2`` (the feature term averaged
    over the channels, see ``feature_alignment_loss``).

    Returns ``{"kd": L_KD, "kl": L_KL, "feat": feature term}``; teacher tensors are detached.
    """
    kl = kd_kl_loss(student_logits, teacher_logits.detach(), temperature)
    feat = feature_alignment_loss(student_features, teacher_features.detach(), align, projection)
    return {"kd": lambda_kl * kl + feat, "kl": kl, "feat": feat}


def ratio_loss(keep_masks: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """Eq. (9): ``1/B sum_b sum_j (target_j - mean_i D_hat_i^{b,j})^2``.

    ``keep_masks``: the running mask after each stage, [B, N] each; ``targets``: the kept
    fraction each stage aims at (``k_j / N`` from the config's keep counts).
    """
    if len(keep_masks) != len(targets):
        raise ValueError(f"{len(keep_masks)} stage masks but {len(targets)} targets")
    if not keep_masks:
        raise ValueError("ratio_loss needs at least one stage (HTS is off: keep_rate 1.0?)")
    kept = torch.stack([m.float().mean(dim=1) for m in keep_masks], dim=1)  # [B, S]
    target = torch.tensor(list(targets), dtype=kept.dtype, device=kept.device)
    return ((kept - target) ** 2).sum(dim=1).mean()


def token_guidance_loss(
    keep_logits: Sequence[torch.Tensor],
    keep_masks: Sequence[torch.Tensor],
    importance: torch.Tensor,
    keep_counts: Sequence[int],
) -> torch.Tensor:
    """Teach each HTS stage to keep the tokens a teacher finds important (beyond the paper).

    At stage j the target of an image token still kept before the stage is 1 when it is among
    the ``keep_counts[j]`` most important of those tokens (``importance`` [B, N], e.g. the
    teacher's attention rollout, in patch-grid order) and 0 otherwise: exactly the set the
    inference top-k should keep. The loss is the binary cross-entropy of the stage's keep logit
    (``keep_logits[j]`` [B, N]) against it, averaged over those tokens, the batch and the stages.
    ``keep_masks[j]``: the running mask after stage j (the tokens alive before stage j + 1).
    """
    if not (len(keep_logits) == len(keep_masks) == len(keep_counts)) or not keep_logits:
        raise ValueError(
            f"need one keep logit, mask and count per stage, got {len(keep_logits)}, "
            f"{len(keep_masks)} and {len(keep_counts)}"
        )
    if importance.shape != keep_logits[0].shape:
        raise ValueError(
            f"importance {tuple(importance.shape)} must match the keep logits "
            f"{tuple(keep_logits[0].shape)} ([batch, image tokens] on the same patch grid)"
        )
    score = importance.detach().float()
    alive = torch.ones_like(score, dtype=torch.bool)
    total = score.new_zeros(())
    for j, (logit, k) in enumerate(zip(keep_logits, keep_counts)):
        if j:
            alive = keep_masks[j - 1].detach() > 0
        top = score.masked_fill(~alive, float("-inf")).topk(int(k), dim=1).indices
        target = torch.zeros_like(score).scatter(1, top, 1.0) * alive
        bce = F.binary_cross_entropy_with_logits(logit.float(), target, reduction="none")
        weight = alive.float()
        total = total + ((bce * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)).mean()
    return total / len(keep_logits)
