"""Token importance maps of a dense pass: which image tokens the class token reads.

Three readings of the attention, each [B, N] in patch-grid order: attention rollout (Abnar &
Zuidema, 2020), the class token's attention averaged over the blocks ("cls-attention", what
token guidance teaches the predictors), and that attention weighted by the norm of what each
token adds through the head ("attention-norm", Kobayashi et al., 2020). The token-selection
check and the research probes compare the predictors' keep scores with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def attention_rollout(attentions: Sequence[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Each image token's importance to the class token: attention rollout.

    ``attentions``: head-averaged attention of every block in order, [B, N, N] each (the last
    may be the class token's row alone, [B, 1, N]). Rollout multiplies ``0.5 A + 0.5 I`` (the
    residual connection) over the blocks; returns the class token's row over the image tokens,
    [B, N - num_prefix] (non-negative; with the prefix tokens it sums to 1).
    """
    rollout = None
    for attn in attentions:
        attn = attn.float()
        eye = torch.eye(attn.shape[-2], attn.shape[-1], device=attn.device)
        step = 0.5 * attn + 0.5 * eye
        rollout = step if rollout is None else step @ rollout
    return rollout[:, 0, num_prefix:]


def class_attention(attentions: Sequence[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Each image token's importance as the class token's attention to it, averaged over the
    blocks (head-averaged, no residual paths), [B, N - num_prefix]; ``attentions`` as for
    ``attention_rollout``. More peaked on the tokens the class token reads than the rollout."""
    return torch.stack([attn[:, 0, num_prefix:].float() for attn in attentions]).mean(dim=0)


# How a dense model's attention becomes per-token importance: the reduction over blocks, and
# what each block returns (``Attention.forward``'s ``return_attention``: the weights, or the
# weights times the value norms).
IMPORTANCE_METHODS = {
    "rollout": attention_rollout,
    "cls-attention": class_attention,
    "attention-norm": class_attention,
}
_ATTENTION_KIND = {"rollout": True, "cls-attention": True, "attention-norm": "norm"}


@torch.no_grad()
def token_importance(
    model: nn.Module, pixel_values: torch.Tensor, method: str = "rollout"
) -> torch.Tensor:
    """Each image token's importance under ``model``'s encoder run densely, [B, N] (grid
    order), ``method`` one of ``IMPORTANCE_METHODS``.

    A teacher or a student alike (a student's predictors are not run: no token is dropped),
    in eval mode: no drop path, no training-only reweight.
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(
            f"unknown token importance {method!r}: use one of {sorted(IMPORTANCE_METHODS)}"
        )
    encoder, kind = model.encoder, _ATTENTION_KIND[method]
    was_training = model.training
    model.eval()
    try:
        x = encoder.embed(pixel_values)
        last = len(encoder.blocks) - 1
        attentions = []
        for i, block in enumerate(encoder.blocks):
            x, attn = block(x, cls_only=i == last, return_attention=kind)
            attentions.append(attn)
    finally:
        model.train(was_training)
    return IMPORTANCE_METHODS[method](attentions, model.config.num_prefix_tokens)


def resample_importance(
    importance: torch.Tensor, source_grid: Sequence[int], target_grid: Sequence[int]
) -> torch.Tensor:
    """Map per-token importance [B, rows * cols] from one patch grid to another (a teacher with
    another patch size or stride than the student), resampled as an image; unchanged when the
    grids match."""
    source_grid, target_grid = tuple(source_grid), tuple(target_grid)
    if source_grid == target_grid:
        return importance
    grid = importance.float().reshape(importance.shape[0], 1, *source_grid)
    return F.interpolate(grid, size=target_grid, mode="bilinear", align_corners=False).flatten(1)
