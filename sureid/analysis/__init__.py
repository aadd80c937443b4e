"""Opt-in diagnostics of a trained model: token importance maps and the token-selection check.

Nothing here runs in training or inference unless asked: the demo runs the check on its HTS
rows, the trainer only with ``check_token_selection=True``, and the research probes use the
importance maps.
"""

from .importance import (
    IMPORTANCE_METHODS,
    attention_rollout,
    class_attention,
    resample_importance,
    token_importance,
)
from .selection import (
    TokenSelectionCheck,
    auc_rows,
    check_token_selection,
    patch_body_flags,
    patch_mask_flags,
    random_decisions,
    score_decisions,
    spearman_rows,
)

__all__ = [
    "IMPORTANCE_METHODS",
    "TokenSelectionCheck",
    "attention_rollout",
    "auc_rows",
    "check_token_selection",
    "class_attention",
    "patch_body_flags",
    "patch_mask_flags",
    "random_decisions",
    "resample_importance",
    "score_decisions",
    "spearman_rows",
    "token_importance",
]
