"""SUREID: occluded person re-identification with hierarchical token sparsification.

The public API, re-exported lazily (PEP 562): ``import sureid`` loads neither torch nor
transformers, and each name loads its module on first use, so the ``sureid`` command answers
``--version``, ``--help`` and ``zoo`` at once. SUREID's configs, models and image processor are
registered with transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoImageProcessor`` and its
``"sureid-feature-extraction"`` pipeline as soon as transformers is imported, before or after
``import sureid`` (``register_with_transformers``). See docs/index.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SureidConfig": "configuration_sureid",
    "SureidStudentConfig": "configuration_sureid",
    "SureidTeacherConfig": "configuration_sureid",
    "SureidError": "errors",
    "SureidImageProcessor": "image_processing_sureid",
    "load_image": "image_processing_sureid",
    "SureidModel": "modeling_sureid",
    "SureidModelOutput": "modeling_sureid",
    "SureidPreTrainedModel": "modeling_sureid",
    "SureidStudentModel": "modeling_sureid",
    "SureidTeacherModel": "modeling_sureid",
    "TokenPredictor": "modeling_sureid",
    "FeatureResult": "inference",
    "SkippedInput": "inference",
    "SureidFeatureExtractionPipeline": "inference",
    "extract_features": "inference",
    "SureidReIDEncoder": "encoder",
    "GalleryIndex": "gallery",
    "SearchResult": "gallery",
    "ModelEvaluation": "evaluation",
    "ReidMetrics": "evaluation",
    "evaluate_model": "evaluation",
    "evaluate_reid": "evaluation",
    "protocol_for_dataset": "evaluation",
    "re_rank": "evaluation",
}

__all__ = ["__version__", "register_with_transformers", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f".{name}", __name__)  # sureid.inference, ...
        raise AttributeError(f"module 'sureid' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    if _pending:
        _register_safely()
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def register_with_transformers() -> None:
    """Register SUREID's configs, models and image processor with ``AutoConfig``,
    ``AutoModel`` and ``AutoImageProcessor``, and the ``"sureid-feature-extraction"``
    pipeline: each module registers what it defines when it is imported, so this imports them.
    Idempotent; runs by itself once transformers is imported."""
    global _pending
    _pending = False
    from . import image_processing_sureid, inference, modeling_sureid  # noqa: F401


# Set when transformers was first imported by one of SUREID's own modules, halfway through its
# import: registering then would import that module again; ``__getattr__`` registers after.
# (Each module registers its own classes when it is imported in any case, so a checkpoint
# loads through the Auto classes; only the pipeline waits for ``sureid.inference``.)
_pending = False


def _inside_sureid_import() -> bool:
    """Whether a SUREID module is halfway through its import (a frame runs its top level)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "<module>" and name.startswith(f"{__name__}."):
            return True
        frame = frame.f_back
    return False


def _register_safely() -> None:
    global _pending
    if _inside_sureid_import():
        _pending = True
        return
    try:
        register_with_transformers()
    except Exception as err:  # never break the import of transformers itself
        warnings.warn(
            f"sureid could not register its classes with transformers ({err!r}); call "
            "sureid.register_with_transformers() to see the traceback",
            stacklevel=2,
        )


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs ``register_with_transformers`` right after ``transformers`` is imported.

    It stays in ``sys.meta_path`` until transformers has really been imported (a mere
    ``importlib.util.find_spec("transformers")``, as availability checks do, imports nothing),
    then leaves."""

    def __init__(self) -> None:
        self._looking = False  # our own find_spec below asks the other finders

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module  # this spec's own loader object

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_safely()

        spec.loader.exec_module = exec_then_register
        return spec


def _default_card(model, folder):
    """``save_pretrained``'s hook: a card without metrics (``model_card.write_default_card``)."""
    from .model_card import write_default_card

    return write_default_card(model, folder)


def _install_hooks() -> None:
    from . import zoo  # registers the zoo's checkpoint hooks (zoo ids, "did you mean")
    from .hooks import register_checkpoint_hooks

    del zoo
    register_checkpoint_hooks(on_save=_default_card)
    if "transformers" in sys.modules:
        _register_safely()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())


_install_hooks()
