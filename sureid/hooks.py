"""Hooks the layers above the models register for checkpoint loading and saving.

The model layer imports neither the zoo nor the model cards, yet ``from_pretrained`` resolves
zoo ids and names close ones in its errors, and ``save_pretrained`` writes a model card: the zoo
and ``sureid/__init__`` register those functions here. Standard library only, so registering
loads nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable

Resolver = Callable[[object, dict], tuple[object, dict]]
Suggester = Callable[[str], str]
SaveHook = Callable[[object, object], object]

_NAME_RESOLVERS: list[Resolver] = []
_NAME_SUGGESTERS: list[Suggester] = []
_SAVE_HOOKS: list[SaveHook] = []


def register_checkpoint_hooks(
    resolve: Resolver | None = None,
    suggest: Suggester | None = None,
    on_save: SaveHook | None = None,
) -> None:
    """Extend checkpoint loading and saving from a layer above the models.

    ``resolve(name, kwargs) -> (name, kwargs)`` runs first in every ``from_pretrained`` (the
    zoo maps its ids to a folder or a repo at a revision; it must leave a resolved name as it
    is); ``suggest(name) -> text`` adds a hint to the error for a bare name that loads nothing;
    ``on_save(model, folder)`` runs after ``save_pretrained`` (the default model card).
    Registering the same function twice is a no-op.
    """
    for hooks, fn in (
        (_NAME_RESOLVERS, resolve),
        (_NAME_SUGGESTERS, suggest),
        (_SAVE_HOOKS, on_save),
    ):
        if fn is not None and fn not in hooks:
            hooks.append(fn)


def resolve_name(name, kwargs: dict) -> tuple[object, dict]:
    """``name`` and ``kwargs`` after every registered resolver."""
    for resolve in _NAME_RESOLVERS:
        name, kwargs = resolve(name, kwargs)
    return name, kwargs


def suggestions(name: str) -> str:
    """The registered hints for a bare name that loads nothing ("" without any)."""
    return "".join(suggest(name) for suggest in _NAME_SUGGESTERS)


def run_save_hooks(model, folder) -> None:
    """Every registered save hook, in order."""
    for hook in _SAVE_HOOKS:
        hook(model, folder)
