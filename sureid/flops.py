"""Multiply-adds (MACs) of SUREID encoders from their token counts: pure arithmetic, no torch.

A transformer block on ``n`` tokens (prefix included) with width ``C`` and MLP width ``H`` costs
``n (4 C^2 + 2 C H) + 2 n^2 C`` multiply-adds: qkv ``3 n C^2``, the projection ``n C^2``, the MLP
``2 n C H``, and attention's ``QK^T`` and ``AV``, ``n^2 C`` each. Norms, softmax, GELU, the patch
embedding and the head are left out. The FLOPs bound of a keep schedule is the dense encoder's
block MACs over the schedule's (the paper's count: every block computes every token it holds).

``as_run=True`` counts what SUREID's models really execute instead: the TokenPredictors' cost at
inference added (:func:`predictor_macs`) and the last block computed for the class token's row
only (``Block(..., cls_only=True)`` in ``modeling_sureid.py``). docs/benchmarks.md explains both
counts; ``tests/test_benchmark.py`` checks them by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from .configuration_sureid import SureidConfig, SureidStudentConfig


def _full_block(n: int, c: int, h: int) -> int:
    """One block on ``n`` tokens: the linear layers plus attention's two ``n x n`` products."""
    return n * (4 * c * c + 2 * c * h) + 2 * n * n * c


def _cls_only_block(n: int, c: int, h: int) -> int:
    """One block computing the class token's row alone, with keys and values of all ``n`` tokens.

    ``2 n C^2`` (keys, values) + ``2 C^2 + 2 C H`` (one query, the projection and the MLP on one
    token) + ``2 n C`` (one attention row).
    """
    return 2 * n * c * c + 2 * c * c + 2 * c * h + 2 * n * c


def block_macs(
    tokens_per_block: Sequence[int],
    hidden_size: int,
    mlp_ratio: float = 4.0,
    cls_only_last: bool = False,
) -> int:
    """Multiply-adds of transformer blocks on the given token counts (prefix tokens included).

    ``H = int(C * mlp_ratio)``. ``cls_only_last``: the last block computes the class token's row
    alone (see the module docstring).
    """
    c = int(hidden_size)
    h = int(c * mlp_ratio)
    counts = list(tokens_per_block)
    if not counts:
        return 0
    last = _cls_only_block if cls_only_last else _full_block
    return sum(_full_block(n, c, h) for n in counts[:-1]) + last(counts[-1], c, h)


def predictor_macs(config: SureidStudentConfig) -> int:
    """Multiply-adds of the TokenPredictors at inference (``TokenPredictor.keep_score``).

    Stage j scores the ``n`` image tokens present before it: per token ``C^2`` (in_conv) +
    ``(C/2)^2`` (first out_conv layer, local half) + ``(C/2)(C/4)`` + ``C/4`` (the keep-minus-drop
    row); per image ``(C/2)^2`` (the global half, computed once).
    """
    if not config.hts_enabled:
        return 0
    c = config.hidden_size
    per_token = c * c + (c // 2) ** 2 + (c // 2) * (c // 4) + c // 4
    total, current = 0, config.num_patches
    for count in config.stage_keep_counts:
        total += current * per_token + (c // 2) ** 2
        current = count
    return total


def student_macs(config: SureidStudentConfig, as_run: bool = False) -> int:
    """Block multiply-adds per image of a student at inference (its keep schedule).

    ``as_run`` False: the paper's count (every block on all its tokens); True: what the student
    executes (the predictors added, the last block on the class token's row).
    """
    macs = block_macs(
        config.tokens_per_block(), config.hidden_size, config.mlp_ratio, cls_only_last=as_run
    )
    return macs + (predictor_macs(config) if as_run else 0)


def dense_macs(config: SureidConfig, as_run: bool = False) -> int:
    """Block multiply-adds per image of the dense model with ``config``'s encoder.

    ``as_run`` True: as a SUREID model runs it (the last block on the class token's row).
    """
    n = config.num_patches + config.num_prefix_tokens
    return block_macs(
        [n] * config.num_hidden_layers, config.hidden_size, config.mlp_ratio, cls_only_last=as_run
    )


def flops_bound(config: SureidStudentConfig) -> float:
    """Speed-up the keep schedule allows from block FLOPs alone: dense MACs / schedule MACs."""
    return dense_macs(config) / student_macs(config)


__all__ = ["block_macs", "dense_macs", "flops_bound", "predictor_macs", "student_macs"]
