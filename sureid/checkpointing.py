"""Crash-safe checkpoints for ``SureidTrainer``: complete or absent, never NaN; resume "latest".

Everything here that overrides a private method of ``transformers.Trainer`` lives in
``CheckpointingMixin`` (``_save_checkpoint``, ``_get_output_dir``,
``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``); tests/test_checkpointing.py
fails loudly when ``transformers`` renames them or changes their signatures.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .configuration_sureid import SureidError

logger = logging.getLogger(__name__)

# The linear NPKD alignments' projection is trained with the student but is not part of it:
# checkpoints carry it in this file beside the optimizer state.
PROJECTION_FILE = "align_projection.safetensors"

# The private ``transformers.Trainer`` methods the mixin overrides, with the parameters it
# relies on (checked by tests/test_checkpointing.py against the installed transformers).
OVERRIDDEN_TRAINER_METHODS = {
    "_save_checkpoint": ("self", "model", "trial"),
    "_get_output_dir": ("self", "trial"),
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
}

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# A checkpoint is written into <run>/tmp-checkpoint-N/checkpoint-N and renamed into place whole.
_STAGING_PREFIX = "tmp-"


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes ``path`` unusable for resuming (None: a complete checkpoint).

    Complete means config.json, the model weights and trainer_state.json, which
    ``transformers.Trainer`` writes last, after the optimizer, scheduler and RNG states.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder" if path.exists() else f"no such folder: {path}"
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any(path.glob("model*.safetensors")):
        missing.append("model.safetensors")
    if not (path / "trainer_state.json").is_file():
        missing.append("trainer_state.json")
    if missing:
        return f"{path} has no {', '.join(missing)} (an interrupted save?)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except ValueError:
        return f"{path}/trainer_state.json is truncated or corrupt"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-N`` in ``output_dir`` with the highest N (None if there is none).

    Incomplete ones (left by an interrupted save of an older version) are skipped with a
    warning; staging folders of an interrupted save (``tmp-checkpoint-N``) never match.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("not resuming from %s: %s", path, problem)
    return None


def resolve_resume(resume, output_dir: str | os.PathLike, *, log: bool = True):
    """The checkpoint a run resumes from: ``resume`` checked, "latest" (or True) looked up.

    ``"latest"`` / True: the newest complete ``checkpoint-N`` in ``output_dir`` (raises
    ``SureidError`` when there is none); a path: it must be a complete checkpoint (raises naming
    what is missing); None / False / "": returned as is (no resumption). With ``log``, says
    "resuming from PATH" (a warning, so it shows without logging set up). Cheap (file checks
    only), so a command line calls it before it loads any data or model.
    """
    if not resume:
        return resume
    if resume is True or resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise SureidError(
                f"no complete checkpoint-N folder in {output_dir} to resume from ('latest'); "
                "start without resuming, or check the output directory"
            )
        if log:
            logger.warning("resuming from %s, the newest complete checkpoint", found)
        return found
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise SureidError(
            f"cannot resume: {problem}. Resume from a complete checkpoint ('latest' picks the "
            "newest one)"
        )
    if log:
        logger.warning("resuming from %s", resume)
    return str(resume)


def _remove_empty_folders(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents up to ``top`` (included) while they are empty folders."""
    for folder in [path, *path.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return


def _non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and float buffers holding NaN or inf (one device sync)."""
    named = [(n, t) for n, t in model.named_parameters()]
    named += [(n, t) for n, t in model.named_buffers() if t.is_floating_point()]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    return [] if bool(ok.all()) else [n for (n, _), good in zip(named, ok.tolist()) if not good]


def _check_weights(model: nn.Module, output_dir: str, when: str) -> None:
    """Raise before a non-finite weight can be saved, naming the newest good checkpoint."""
    bad = _non_finite_tensors(model)
    if bad:
        good = latest_checkpoint(output_dir)
        then = (
            f"the newest good checkpoint is {good}: resume from it with a lower learning rate"
            if good
            else "no checkpoint was written yet: start again with a lower learning rate"
        )
        raise SureidError(
            f"{len(bad)} weight tensors became NaN/inf {when} (first: {bad[0]}): the update "
            f"diverged, and training stopped before saving them; {then} (or check the data)."
        )


class _FiniteWeightsGuard(TrainerCallback):
    """Checks the weights right after each optimizer step, before anything can save them.

    The loss check in ``compute_loss`` runs before backward, so it cannot see the update of
    its own step: a finite loss with a diverging step (a too-high or NaN learning rate) would
    otherwise be saved as a NaN checkpoint by the save that follows.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _check_weights(model, args.output_dir, f"at step {state.global_step + 1}")


def _move_into_place(source: str, target: str) -> None:
    """Rename a finished checkpoint folder to its final name, replacing an older one."""
    old = None
    if os.path.exists(target):  # e.g. a new run in the same output_dir
        old = os.path.join(
            os.path.dirname(target), f"{_STAGING_PREFIX}old-{os.path.basename(target)}"
        )
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointingMixin:
    """Mixed into ``SureidTrainer`` before ``transformers.Trainer``: checkpoints are written
    into a staging folder and renamed into place whole; weights are checked for NaN/inf after
    every optimizer step and before every save; ``train(resume_from_checkpoint="latest")``
    picks the newest complete checkpoint. ``align_projection`` (an ``nn.Module`` or None on
    the trainer) is saved and restored with the optimizer state."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if getattr(self, "align_projection", None) is not None and self.args.should_save:
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in self.align_projection.state_dict().items()}
            save_file(state, os.path.join(output_dir, PROJECTION_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if getattr(self, "align_projection", None) is not None and checkpoint is not None:
            path = os.path.join(checkpoint, PROJECTION_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: this checkpoint was not written by a run with "
                    f"align={self.args.align!r}"
                )
            from safetensors.torch import load_file

            self.align_projection.load_state_dict(load_file(path))
        super()._load_optimizer_and_scheduler(checkpoint)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train`` with checked resumption and a guard against diverged weights.

        ``resume_from_checkpoint="latest"`` (or True) picks the complete ``checkpoint-N`` with
        the highest N in ``output_dir``; a named checkpoint must be complete; either way the
        log says "resuming from PATH" (:func:`resolve_resume`). After every
        optimizer step the weights are checked, so a NaN checkpoint is never written.
        """
        if not any(isinstance(cb, _FiniteWeightsGuard) for cb in self.callback_handler.callbacks):
            self.add_callback(_FiniteWeightsGuard())
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (checkpoints and the final save alike), never with NaN/inf weights."""
        model = self.accelerator.unwrap_model(self.model)
        _check_weights(model, self.args.output_dir, "before saving the model")
        super().save_model(output_dir, _internal_call)

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into a staging folder and rename it into place when complete.

        Interrupted (Ctrl-C, a crash, a full disk), a save leaves no ``checkpoint-N`` at all:
        only ``tmp-checkpoint-N``, which resuming and checkpoint rotation ignore and the next
        save of that step removes. Rotation (``save_total_limit``) runs after the rename.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{_STAGING_PREFIX}{name}")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N, every file
            best = self.state.best_model_checkpoint
            if self.args.should_save and best and Path(best).parent == Path(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, Path(best).name)
                self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                _move_into_place(os.path.join(staging, name), os.path.join(run_dir, name))
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_dir = None
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
