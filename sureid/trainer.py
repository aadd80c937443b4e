"""Training on ``transformers.Trainer``: a teacher (CE + triplet) or an HTS student with NPKD.

``SureidTrainer`` draws P identities x K images per batch (``IdentitySampler``), builds the NODA
batch (``NodaCollator``: each batch doubled, the copy with a pasted occluder), computes the
paper's loss (14) and logs every term and each stage's kept ratio. Its evaluation extracts
query / gallery features with the model in eval mode (true token dropping) and reports R1, mAP
and mINP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .configuration_sureid import HTS_SAMPLINGS, SureidError
from .data.noda import build_train_collator
from .data.sampler import IdentitySampler
from .losses import (
    ALIGNMENTS,
    FEATURE_REDUCTIONS,
    cross_entropy_label_smooth,
    expected_ratio_loss,
    npkd_loss,
    occlusion_loss,
    ratio_loss,
    token_guidance_loss,
    triplet_loss,
)
from .modeling_sureid import resample_importance, token_importance

logger = logging.getLogger(__name__)

_PROJECTION_FILE = "align_projection.safetensors"
TOKEN_GUIDANCE = ("rollout", "cls-attention", "attention-norm", "none")
RATIO_ON = ("decisions", "probabilities")


@dataclass
class SureidTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's defaults and the SUREID loss / data options.

    Paper defaults: SGD momentum 0.9, lr 0.008, cosine decay (with a short linear warm-up),
    weight decay 1e-4, batch 64 = 16 identities x 4 images, 200 epochs, alpha = beta = 1,
    lambda_ratio 2, lambda_kl 0.1, T 1, NODA on. Every other field is ``TrainingArguments``'
    own, with its default. Loss (14): ``alpha (L_KD + lambda_ratio L_ratio) + beta (L_cls +
    L_tri)``; docs/method.md and docs/training.md give the terms.

    Args:
        learning_rate (`float`, *optional*, defaults to `0.008`):
            Peak learning rate (the paper's).
        weight_decay (`float`, *optional*, defaults to `1e-4`):
            SGD weight decay.
        num_train_epochs (`float`, *optional*, defaults to `200`):
            Epochs (the paper's 200); ``max_steps`` > 0 overrides it.
        per_device_train_batch_size (`int`, *optional*, defaults to `64`):
            Images per batch before NODA doubles it: P identities x K images, so a multiple of
            ``num_instances``.
        per_device_eval_batch_size (`int`, *optional*, defaults to `128`):
            Images per batch of the query / gallery feature extraction in ``evaluate``.
        lr_scheduler_type (`str`, *optional*, defaults to `"cosine"`):
            Learning-rate decay after the warm-up.
        warmup_steps (`float`, *optional*, defaults to `0.05`):
            Linear warm-up: a number of steps, or (below 1) a fraction of all steps.
        optim (`str`, *optional*, defaults to `"sgd"`):
            The optimizer (the paper's SGD).
        optim_args (`str`, *optional*, defaults to `"momentum=0.9"`):
            Extra optimizer arguments (the paper's momentum).
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Kept False: the collators need the data set's ``image``, ``pid``, ``camid`` and
            ``path`` columns, which the model's forward does not name.
        logging_steps (`float`, *optional*, defaults to `10`):
            Steps between training logs (each with the mean of every loss term and kept ratio).
        save_strategy (`str`, *optional*, defaults to `"epoch"`):
            When checkpoints are written.
        num_instances (`int`, *optional*, defaults to `4`):
            K: images per identity in a batch.
        alpha (`float`, *optional*, defaults to `1.0`):
            Weight of ``L_KD + lambda_ratio L_ratio`` (the paper uses 2 on Occluded-REID and
            Partial-REID).
        beta (`float`, *optional*, defaults to `1.0`):
            Weight of ``L_cls + L_tri``.
        lambda_ratio (`float`, *optional*, defaults to `2.0`):
            Weight of the ratio loss (9) that pulls each stage's kept fraction to its target.
        ratio_on (`str`, *optional*, defaults to `"decisions"`):
            What the ratio loss measures: `"decisions"`, the share of tokens the sampled
            decisions keep (the paper's eq. 9), or `"probabilities"`, the share kept in
            expectation, the mean keep probability of the tokens still alive (beyond the paper:
            no sampling noise in the budget's gradient).
        lambda_kl (`float`, *optional*, defaults to `0.1`):
            Weight of the KL term of the distillation loss (13).
        kd_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature T of the KL term, eq. (12).
        align (`str`, *optional*, defaults to `"t2s-interp"`):
            How teacher and student features are aligned in NPKD, one of ``losses.ALIGNMENTS``
            (interpolation or a linear projection, teacher-to-student or student-to-teacher:
            the paper's Table VI).
        feature_reduction (`str`, *optional*, defaults to `"mean"`):
            How the feature term ``|| f_s - I(f_t) ||^2`` of (13) reduces over the channels:
            `"mean"` (our reading) or `"sum"` (the squared norm as the paper writes it, C times
            larger; docs/training.md says what each measured).
        label_smoothing (`float`, *optional*, defaults to `0.1`):
            Label smoothing of the identity cross-entropy; 0 = plain cross-entropy.
        triplet_margin (`float` or `None`, *optional*, defaults to `0.3`):
            Margin of the batch-hard triplet loss; None = soft margin.
        noda (`bool`, *optional*, defaults to `True`):
            Noise-occlusion data augmentation: each batch doubled, the copy with a pasted
            occluder.
        occluders (`str`, *optional*, defaults to `"builtin"`):
            NODA's occluders: ``"builtin"`` (drawn shapes) or a folder of occluder images.
        color_jitter (`bool`, *optional*, defaults to `False`):
            Colour jitter in the training transform (the paper: on for Occluded-REID and
            Partial-REID).
        random_erasing (`float`, *optional*, defaults to `0.5`):
            Probability of random erasing per image.
        random_patch (`float`, *optional*, defaults to `0.5`):
            Probability of the batch-level random patch per image.
        token_guidance (`str`, *optional*, defaults to `"none"`):
            HTS students only. A loss term (`loss_token`) teaches each stage's predictor the
            top-k tokens of the teacher's token importance (without a teacher: of the dense model
            the student starts from): `"rollout"` (attention rollout), `"cls-attention"` (the
            class token's attention averaged over blocks) or `"attention-norm"` (that attention
            times the norm of what each token adds through the head, averaged over blocks).
            `"none"`: the paper's recipe.
        lambda_token (`float`, *optional*, defaults to `1.0`):
            Weight of the token-guidance loss (>= 0).
        lambda_occlusion (`float`, *optional*, defaults to `0.0`):
            Weight of ``loss_occlusion`` (>= 0; beyond the paper, 0 = off): the HTS predictors
            learn to drop the image tokens mostly covered by the occluder NODA pasted, which
            the NODA collator marks in ``occlusion_masks``. Needs ``noda=True``.
        predictor_learning_rate (`float`, *optional*, defaults to `None`):
            Learning rate of the HTS predictors; None = `learning_rate`.
        freeze_backbone_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps at the start during which only the HTS predictors learn.

    Example:

    ```python
    >>> from sureid.trainer import SureidTrainingArguments
    >>> args = SureidTrainingArguments(output_dir="runs/student", alpha=2.0, color_jitter=True)
    >>> args.per_device_train_batch_size // args.num_instances  # identities per batch
    16
    ```
    """

    learning_rate: float = field(default=0.008, metadata={"help": "Paper: 0.008."})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay."})
    num_train_epochs: float = field(default=200, metadata={"help": "Paper: 200 epochs."})
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Images per batch before NODA doubles it (P x K)."}
    )
    per_device_eval_batch_size: int = field(default=128)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Linear warm-up: steps, or a fraction of all steps."}
    )
    optim: str = field(default="sgd")
    optim_args: str | None = field(default="momentum=0.9")
    remove_unused_columns: bool = field(default=False)
    logging_steps: float = field(default=10)
    save_strategy: str = field(default="epoch")
    # --- SUREID ---
    num_instances: int = field(default=4, metadata={"help": "K: images per identity in a batch."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of L_KD + lambda_ratio L_ratio."})
    beta: float = field(default=1.0, metadata={"help": "Weight of L_cls + L_tri."})
    lambda_ratio: float = field(default=2.0, metadata={"help": "Weight of the ratio loss (9)."})
    ratio_on: str = field(
        default="decisions",
        metadata={"help": "Ratio loss on the sampled 'decisions' (paper) or 'probabilities'."},
    )
    lambda_kl: float = field(default=0.1, metadata={"help": "Weight of the KL term in (13)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "T of eq. (12)."})
    align: str = field(default="t2s-interp", metadata={"help": f"One of {ALIGNMENTS}."})
    feature_reduction: str = field(
        default="mean",
        metadata={"help": "Feature term of (13) over channels: 'mean' or 'sum' (as written)."},
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "0 = plain cross-entropy."})
    triplet_margin: float | None = field(
        default=0.3, metadata={"help": "Triplet margin; None = soft margin."}
    )
    noda: bool = field(default=True, metadata={"help": "Noise-occlusion data augmentation."})
    occluders: str = field(
        default="builtin", metadata={"help": "'builtin' or a folder of occluder images."}
    )
    color_jitter: bool = field(
        default=False, metadata={"help": "Paper: on for Occluded/Partial-REID."}
    )
    random_erasing: float = field(default=0.5, metadata={"help": "Random erasing probability."})
    random_patch: float = field(default=0.5, metadata={"help": "Random patch probability."})
    token_guidance: str = field(
        default="none",
        metadata={
            "help": "HTS students: 'rollout' / 'cls-attention' / 'attention-norm' teaches the predictors the "
            "teacher's (or, without one, the initial dense model's) token importance; 'none' = "
            "the paper's recipe."
        },
    )
    lambda_token: float = field(
        default=1.0, metadata={"help": "Weight of the token-guidance loss (loss_token)."}
    )
    lambda_occlusion: float = field(
        default=0.0,
        metadata={
            "help": "HTS students with NODA: weight of loss_occlusion, which teaches the "
            "predictors to drop the occluder NODA pasted (beyond the paper; 0 = off)."
        },
    )
    predictor_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the HTS predictors; None = learning_rate."},
    )
    freeze_backbone_steps: int = field(
        default=0,
        metadata={"help": "Steps at the start during which only the HTS predictors learn."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_instances < 1 or self.per_device_train_batch_size % self.num_instances:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_instances ({self.num_instances}): a batch is P identities x K images"
            )
        if self.align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS}, got {self.align!r}")
        if self.feature_reduction not in FEATURE_REDUCTIONS:
            raise ValueError(
                f"feature_reduction must be one of {FEATURE_REDUCTIONS}, got "
                f"{self.feature_reduction!r}"
            )
        if self.ratio_on not in RATIO_ON:
            raise ValueError(f"ratio_on must be one of {RATIO_ON}, got {self.ratio_on!r}")
        if self.token_guidance not in TOKEN_GUIDANCE:
            raise ValueError(
                f"token_guidance must be one of {TOKEN_GUIDANCE}, got {self.token_guidance!r}"
            )
        if not self.lambda_token >= 0:
            raise ValueError(f"lambda_token must be >= 0, got {self.lambda_token}")
        if not self.lambda_occlusion >= 0:
            raise ValueError(f"lambda_occlusion must be >= 0, got {self.lambda_occlusion}")
        if self.lambda_occlusion > 0 and not self.noda:
            raise ValueError(
                "lambda_occlusion > 0 learns from the occluders NODA pastes: set noda=True "
                "(or lambda_occlusion=0)"
            )
        if self.predictor_learning_rate is not None and not self.predictor_learning_rate > 0:
            raise ValueError(
                f"predictor_learning_rate must be positive (or None), got "
                f"{self.predictor_learning_rate}"
            )
        if self.freeze_backbone_steps < 0:
            raise ValueError(
                f"freeze_backbone_steps must be >= 0, got {self.freeze_backbone_steps}"
            )


class SeededCollate:
    """Runs a collator under a torch seed derived from the batch itself (its image paths).

    Augmentation randomness then depends only on ``seed`` and the batch's content, not on the
    global RNG: a resumed run (whose RNG state ``Trainer`` restores only after fetching the
    first batch) and DataLoader workers draw exactly what an uninterrupted run draws, and the
    global RNG (Gumbel noise, drop path) is left untouched. Picklable for workers.
    """

    def __init__(self, collator, seed: int = 0):
        self.collator = collator
        self.seed = int(seed)

    def __call__(self, samples):
        key = "|".join(str(s.get("path", (s.get("pid"), s.get("camid")))) for s in samples)
        digest = hashlib.blake2b(f"{self.seed}|{key}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            return self.collator(samples)


# --------------------------------------------------------------------------------------------
# Checkpoints: complete or absent, never NaN
# --------------------------------------------------------------------------------------------

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


class SureidTrainer(Trainer):
    """Trains a teacher (no ``teacher`` given) or distils an HTS student from a frozen teacher.

    ``train_dataset``: a ``datasets.Dataset`` with ``image``, ``pid`` (0..K-1), ``camid`` (a
    ``load_reid_dataset(...)["train"]``). ``eval_dataset``: a ``DatasetDict`` or dict with
    ``query`` and ``gallery`` splits. The teacher is put in eval mode with gradients off, moved
    to the student's device, and never saved into the student's checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        args: SureidTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        teacher: nn.Module | None = None,
        train_collator=None,
        eval_protocol: str = "market",
        guide: nn.Module | None = None,
        **kwargs,
    ):
        if not isinstance(args, SureidTrainingArguments):
            raise TypeError("SureidTrainer needs SureidTrainingArguments (the paper's defaults)")
        # Token guidance needs a model whose attention says which tokens matter: the teacher,
        # else ``guide``, else a frozen copy of the student as it starts (run densely).
        self.guide = None
        if _has_hts(model) and args.token_guidance != "none" and teacher is None:
            self.guide = guide if guide is not None else _frozen_copy(model)
            self.guide.eval().requires_grad_(False)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if args.freeze_backbone_steps:
            callbacks.append(_BackboneFreeze(args.freeze_backbone_steps))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks or None,
            **kwargs,
        )
        self.reid_eval_dataset = eval_dataset
        self.eval_protocol = eval_protocol
        self.train_collator = train_collator
        self.teacher = teacher
        self.align_projection = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            s_ids = getattr(model.config, "num_identities", 0)
            t_ids = getattr(teacher.config, "num_identities", 0)
            if s_ids != t_ids:
                raise SureidError(
                    f"student has num_identities={s_ids} but the teacher {t_ids}: NPKD's KL term "
                    "compares their logits, so both must be trained on the same identities"
                )
            if args.align.endswith("linear"):
                c_s, c_t = model.config.hidden_size, teacher.config.hidden_size
                dims = (c_t, c_s) if args.align == "t2s-linear" else (c_s, c_t)
                self.align_projection = nn.Linear(*dims)
        self._terms: dict[str, float] = defaultdict(float)
        self._term_steps = 0
        # What the model card says beyond what the trainer knows (train_main fills it): dataset,
        # test_dataset, base_model, started_from, teacher, command; see model_card.build_model_card.
        self.model_card_info: dict = {}
        self._last_evaluation: dict | None = None  # metrics and the step they were measured at

    # -- data ---------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """P x K identity batches through the (NODA) collator, split across processes by accelerate."""
        if self.train_dataset is None:
            raise ValueError("SureidTrainer: training requires a train_dataset")
        args: SureidTrainingArguments = self.args
        if "pid" not in self.train_dataset.column_names:
            raise SureidError(
                f"train_dataset needs a 'pid' column (has {self.train_dataset.column_names}); "
                "use load_reid_dataset(...)['train']"
            )
        sampler = IdentitySampler(
            self.train_dataset["pid"],
            num_identities=args.per_device_train_batch_size // args.num_instances,
            num_instances=args.num_instances,
            seed=args.seed,
            num_replicas=self.accelerator.num_processes,
            rank=0,
            shard=False,
        )
        collator = self.train_collator
        if collator is None:
            config = self.model.config
            collator = build_train_collator(
                tuple(config.image_size),
                noda=args.noda,
                occluders=args.occluders,
                color_jitter=args.color_jitter,
                random_patch_p=args.random_patch,
                erasing_p=args.random_erasing,
                mean=config.image_mean,
                std=config.image_std,
            )
        loader = DataLoader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=SeededCollate(collator, args.seed),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            drop_last=True,
        )
        return self.accelerator.prepare(loader)

    # -- optimisation -------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr = self.args.predictor_learning_rate
        if lr is not None and not getattr(self, "_predictor_group_added", False):
            _split_predictor_groups(optimizer, self._unwrapped(), lr)
            self._predictor_group_added = True
        if self.align_projection is not None and not getattr(self, "_projection_added", False):
            self.align_projection.to(self.args.device)
            optimizer.add_param_group({"params": list(self.align_projection.parameters())})
            self._projection_added = True
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Loss (14): ``alpha (L_KD + lambda_ratio L_ratio) + beta (L_cls + L_tri)``, plus
        ``lambda_token L_token`` for HTS students with token guidance (beyond the paper).

        Without a teacher: ``beta (L_cls + L_tri)`` plus ``alpha lambda_ratio L_ratio`` when the
        model has HTS stages (the "+HTS" row of the paper's Table IV). ``L_token`` teaches each
        stage's predictor the top-k of the teacher's attention rollout (without a teacher: the
        guide's), computed in the forward pass NPKD already makes.
        """
        args: SureidTrainingArguments = self.args
        pixels, labels = inputs["pixel_values"], inputs["labels"]
        out = model(pixel_values=pixels)
        if out.logits is None:
            raise SureidError("the model has no classifier: set num_identities in its config")
        terms = {
            "cls": cross_entropy_label_smooth(out.logits, labels, args.label_smoothing),
            "tri": triplet_loss(out.features, labels, args.triplet_margin),
        }
        loss = args.beta * (terms["cls"] + terms["tri"])
        hts = 0.0
        guided = bool(out.keep_logits) and args.token_guidance != "none"
        cfg = self._unwrapped().config
        if out.keep_masks:
            targets = [k / cfg.num_patches for k in cfg.stage_keep_counts]
            if args.ratio_on == "probabilities":
                terms["ratio"] = expected_ratio_loss(out.keep_probs, out.keep_masks, targets)
            else:
                terms["ratio"] = ratio_loss(out.keep_masks, targets)
            hts = args.lambda_ratio * terms["ratio"]
        importance = None
        if self.teacher is not None:
            teacher = self._on_device(self.teacher, pixels.device)
            with torch.no_grad():
                t_out = teacher(
                    pixel_values=pixels, output_token_importance=guided and args.token_guidance
                )
            importance = t_out.token_importance
            kd = npkd_loss(
                out.features,
                t_out.features,
                out.logits,
                t_out.logits,
                lambda_kl=args.lambda_kl,
                temperature=args.kd_temperature,
                align=args.align,
                projection=self.align_projection,
                feature_reduction=args.feature_reduction,
            )
            terms.update(kl=kd["kl"], feat=kd["feat"], kd=kd["kd"])
            loss = loss + args.alpha * (kd["kd"] + hts)
        elif out.keep_masks:
            loss = loss + args.alpha * hts
        if guided:
            if importance is None:
                guide = self._on_device(self.guide, pixels.device)
                importance = token_importance(guide, pixels, args.token_guidance)
            importance = resample_importance(importance, self._guide_grid(), cfg.grid_size)
            terms["token"] = token_guidance_loss(
                out.keep_logits, out.keep_masks, importance, cfg.stage_keep_counts
            )
            loss = loss + args.lambda_token * terms["token"]
        if out.keep_logits and args.lambda_occlusion > 0:
            terms["occlusion"] = occlusion_loss(
                out.keep_logits, out.keep_masks, self._occluded_tokens(inputs, cfg)
            )
            loss = loss + args.lambda_occlusion * terms["occlusion"]
        terms["total"] = loss
        self._check_finite(terms)
        self._record(terms, out.keep_masks)
        return (loss, out) if return_outputs else loss

    @staticmethod
    def _occluded_tokens(inputs: dict, config) -> torch.Tensor:
        """[B, N] bools: the image tokens mostly (over half) covered by the occluder the NODA
        collator pasted (its ``occlusion_masks``, [B, H, W])."""
        from .evaluation import patch_mask_flags

        masks = inputs.get("occlusion_masks")
        if masks is None:
            raise SureidError(
                "lambda_occlusion > 0 needs the batch's occlusion_masks, which only the NODA "
                "collator writes: train with noda=True (--noda), or set lambda_occlusion=0"
            )
        return patch_mask_flags(masks, config)

    def _guide_grid(self) -> tuple[int, int]:
        source = self.teacher if self.teacher is not None else self.guide
        return tuple(source.config.grid_size)

    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @staticmethod
    def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
        if next(module.parameters()).device != device:
            module.to(device)
        return module

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            if not torch.isfinite(value.detach()).all():
                good = latest_checkpoint(self.args.output_dir)
                where = f"newest good checkpoint: {good}" if good else "none written yet"
                raise SureidError(
                    f"loss term '{name}' is {float(value.detach())} at step {self.state.global_step}: "
                    f"training stopped before writing another checkpoint ({where}). Lower the "
                    "learning rate, check the input images, or resume from a good checkpoint."
                )

    def _record(self, terms: dict[str, torch.Tensor], keep_masks) -> None:
        for name, value in terms.items():
            self._terms[f"loss_{name}"] += float(value.detach())
        for j, mask in enumerate(keep_masks or ()):
            self._terms[f"kept_ratio_stage{j + 1}"] += float(mask.detach().float().mean())
        self._term_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of every loss term and kept ratio since the last training log."""
        if "loss" in logs and self._term_steps:
            for name, total in self._terms.items():
                logs[name] = round(total / self._term_steps, 6)
            self._terms.clear()
            self._term_steps = 0
        super().log(logs, start_time)

    # -- checkpoints (the alignment projection of the linear ablations) -----------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.align_projection is not None and self.args.should_save:
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in self.align_projection.state_dict().items()}
            save_file(state, os.path.join(output_dir, _PROJECTION_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.align_projection is not None and checkpoint is not None:
            path = os.path.join(checkpoint, _PROJECTION_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: this checkpoint was not written by a run with "
                    f"align={self.args.align!r}"
                )
            from safetensors.torch import load_file

            self.align_projection.load_state_dict(load_file(path))
        super()._load_optimizer_and_scheduler(checkpoint)

    # -- checkpoints: written whole, never with NaN weights; resume "latest" ------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train`` with checked resumption and a guard against diverged weights.

        ``resume_from_checkpoint="latest"`` (or True) picks the complete ``checkpoint-N`` with
        the highest N in ``output_dir``; a named checkpoint must be complete. After every
        optimizer step the weights are checked, so a NaN checkpoint is never written.
        """
        if not any(isinstance(cb, _FiniteWeightsGuard) for cb in self.callback_handler.callbacks):
            self.add_callback(_FiniteWeightsGuard())
        if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise SureidError(
                    f"no complete checkpoint-N folder in {self.args.output_dir} to resume from "
                    "('latest'); start without resuming, or check the output directory"
                )
            logger.warning("resuming from %s, the newest complete checkpoint", found)
            resume_from_checkpoint = found
        elif resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise SureidError(
                    f"cannot resume: {problem}. Resume from a complete checkpoint ('latest' "
                    "picks the newest one)"
                )
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (checkpoints and the final save alike), never with NaN/inf weights.

        The final save (not a checkpoint's) also writes the model card, ``README.md``
        (``write_model_card``)."""
        _check_weights(self._unwrapped(), self.args.output_dir, "before saving the model")
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            self.write_model_card(output_dir)

    def write_model_card(self, output_dir: str | None = None, **info):
        """Write ``README.md`` (``model_card.build_model_card``) into ``output_dir``.

        The card carries the metrics of the last ``evaluate()`` only when it evaluated these
        weights (at the current step); otherwise it has no metrics. It also says how the model
        was trained (the SUREID arguments), the teacher, and what ``model_card_info`` and
        ``info`` add (the data set, where the weights started, the command). Returns the path
        (None on the processes that do not save).
        """
        from .model_card import build_model_card, write_model_card

        if not self.args.should_save:
            return None
        model = self._unwrapped()
        last = self._last_evaluation
        metrics = last["metrics"] if last and last["step"] == self.state.global_step else None
        info = {**self.model_card_info, **info}
        if info.get("teacher") is None and self.teacher is not None:
            info["teacher"] = _describe_model(self.teacher)
        if metrics and info.get("test_dataset") is None and info.get("dataset") is None:
            info["test_dataset"] = "unnamed"  # the trainer's eval_dataset carries no name
        card = build_model_card(
            model,
            metrics=metrics,
            protocol=self.eval_protocol if metrics else None,
            training=self._card_training_arguments(),
            load_id=info.pop("load_id", None) or str(output_dir or self.args.output_dir),
            **info,
        )
        return write_model_card(output_dir or self.args.output_dir, card)

    def _card_training_arguments(self) -> dict:
        """The arguments that made the model: SUREID's fields and the schedule's."""
        a = self.args
        names = ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size"]
        names += ["optim", "optim_args", "weight_decay", "lr_scheduler_type", "warmup_steps"]
        names += [n for n in SureidTrainingArguments.__annotations__ if n not in names]
        skip = {"per_device_eval_batch_size", "remove_unused_columns", "logging_steps"}
        skip |= {"save_strategy"}
        if self.teacher is None:
            skip |= {"lambda_kl", "kd_temperature", "align", "feature_reduction"}
        if not _has_hts(self._unwrapped()):
            skip |= {"lambda_ratio", "ratio_on", "token_guidance", "lambda_token"}
            skip |= {"lambda_occlusion"}
            skip |= {"predictor_learning_rate", "freeze_backbone_steps"}
            if self.teacher is None:
                skip.add("alpha")
        out = {n: getattr(a, n) for n in names if n not in skip and hasattr(a, n)}
        out.update(seed=a.seed, bf16=a.bf16, fp16=a.fp16, steps_trained=self.state.global_step)
        return out

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ):
        """transformers' hook (``Trainer.push_to_hub`` calls it): SUREID's card
        (``write_model_card``) in ``output_dir`` instead of transformers' own."""
        if not self.is_world_process_zero():
            return
        info = {"model_name": model_name, "base_model": finetuned_from}
        info["license"] = license
        info["tags"] = [tags] if isinstance(tags, str) else tags
        if dataset:
            info["dataset"] = dataset if isinstance(dataset, str) else dataset[0]
        self.write_model_card(self.args.output_dir, **{k: v for k, v in info.items() if v})

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

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """R1 / R5 / mAP / mINP on query vs gallery, the model in eval mode (true dropping).

        Returns (and logs) ``{prefix}_R1``, ``{prefix}_R5``, ``{prefix}_mAP`` and
        ``{prefix}_mINP`` as fractions in [0, 1], computed as ``evaluation.evaluate_model`` does
        (``extract_features``, then ``evaluate_splits`` under ``eval_protocol``). For an HTS
        student also the predictor check (``evaluation.check_token_selection`` against the
        teacher, or without one the guide): ``{prefix}_random_R1`` / ``_random_mAP`` (as many
        tokens kept at random, mean of 5 draws; ``_random_R1_min`` / ``_max`` over the draws),
        ``_guide_R1`` / ``_guide_mAP`` (the guide's rollout top-k), ``_spearman`` and, with
        visible-body masks in the query split, ``_body_share`` / ``_body_chance`` and
        ``_body_auc`` / ``_guide_body_auc``.
        """
        from .evaluation import evaluate_splits
        from .inference import extract_features

        data = eval_dataset if eval_dataset is not None else self.reid_eval_dataset
        if data is None or "query" not in data or "gallery" not in data:
            raise SureidError("evaluation needs an eval_dataset with 'query' and 'gallery' splits")
        model = self._unwrapped()
        was_training = model.training
        batch = self.args.per_device_eval_batch_size
        feats = {}
        for split in ("query", "gallery"):
            feats[split] = extract_features(
                model, data[split], batch_size=batch, device=self.args.device, progress=False
            )
        model.train(was_training)
        result = evaluate_splits(
            feats["query"], feats["gallery"], data["query"], data["gallery"], self.eval_protocol
        )
        metrics = {
            f"{metric_key_prefix}_R1": result.rank(1),
            f"{metric_key_prefix}_R5": result.rank(5),
            f"{metric_key_prefix}_mAP": result.mAP,
            f"{metric_key_prefix}_mINP": result.mINP,
        }
        if _has_hts(model):
            metrics.update(self._token_selection_metrics(model, data, metric_key_prefix))
        if metric_key_prefix == "eval" and eval_dataset is None:  # what the model card reports
            self._last_evaluation = {"metrics": dict(metrics), "step": self.state.global_step}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def _token_selection_metrics(self, model, data, prefix: str) -> dict[str, float]:
        from .evaluation import check_token_selection

        guide = self.teacher if self.teacher is not None else self.guide
        check = check_token_selection(
            model,
            data["query"],
            data["gallery"],
            guide=guide,
            protocol=self.eval_protocol,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            seed=self.args.seed,
        )
        summary = check.summary()
        return {
            f"{prefix}_{name}": value
            for name, value in summary.items()
            if value is not None and not name.startswith("predictor_")
        }


def _describe_model(model: nn.Module) -> str:
    """A model for a card: where it was loaded from, else its class and width."""
    where = getattr(model, "name_or_path", "") or ""
    config = getattr(model, "config", None)
    what = type(model).__name__
    if config is not None:
        what += f" (hidden {config.hidden_size}, {config.num_hidden_layers} blocks)"
    return f"{where}: {what}" if where else what


def _has_hts(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "hts_enabled", False))


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` as it is now: the guide of an HTS student without a teacher."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def _split_predictor_groups(optimizer, model: nn.Module, lr: float) -> None:
    """Give the HTS predictors' parameters their own learning rate: each parameter group is
    split in two (same settings), the predictors' half with ``lr``."""
    predictor_ids = {id(p) for p in getattr(model, "predictors", nn.ModuleList()).parameters()}
    if not predictor_ids:
        return
    new_groups = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in predictor_ids]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in predictor_ids]
            new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
    for group in new_groups:
        group["lr"] = lr
        optimizer.add_param_group(group)


class _BackboneFreeze(TrainerCallback):
    """For the first ``steps`` optimizer steps only the HTS predictors learn: every other
    gradient is dropped before the step (so neither the update nor weight decay touches it)."""

    def __init__(self, steps: int):
        self.steps = int(steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step >= self.steps:
            return
        for name, param in model.named_parameters():
            if ".predictors." not in f".{name}":
                param.grad = None


# --------------------------------------------------------------------------------------------
# Command-line recipe shared by examples/train_teacher.py, examples/train_distill.py, `sureid train`
# --------------------------------------------------------------------------------------------


def build_training_parser(role: str, parser=None):
    """argparse options of the training recipe; ``role`` is "teacher" or "student"."""
    import argparse

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    p = parser or argparse.ArgumentParser(
        description=f"Train a SUREID {role} (paper defaults; see docs/training.md)."
    )
    p.add_argument(
        "--dataset", required=True, help="market1501, dukemtmc, occluded_duke, folder, synthetic"
    )
    p.add_argument(
        "--data-root", required=True, help="folder holding the data set (created for synthetic)"
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--test-dataset", default=None, help="evaluate on another set (cross-domain)")
    p.add_argument("--test-root", default=None)
    default_model = (
        "vit_base_patch16_224" if role == "teacher" else "deit_small_distilled_patch16_224"
    )
    p.add_argument("--timm-model", default=default_model, help="ImageNet ViT/DeiT to start from")
    p.add_argument(
        "--imagenet-checkpoint", default=None, help=".pth/.safetensors; omitted: timm downloads"
    )
    p.add_argument(
        "--from-scratch", action="store_true", help="random init instead of ImageNet weights"
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this SUREID checkpoint (dir or hub id; teacher or student) instead of "
        "ImageNet weights: its architecture, all its weights that fit (a new classifier when the "
        "identities differ; HTS predictors kept when present)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="default 256 128 (with --init-from: the checkpoint's)",
    )
    p.add_argument("--patch-size", type=int, default=None, help="from-scratch only (default 16)")
    p.add_argument("--stride", type=int, default=None, help="patch stride (12 = overlapping)")
    p.add_argument("--hidden-size", type=int, default=None, help="from-scratch only")
    p.add_argument("--depth", type=int, default=None, help="from-scratch only")
    p.add_argument("--heads", type=int, default=None, help="from-scratch only")
    if role == "student":
        p.add_argument("--teacher", default=None, help="teacher checkpoint dir (omit: no NPKD)")
        p.add_argument("--keep-rate", type=float, default=0.7)
        p.add_argument("--sparsify-layers", type=int, nargs="+", default=None)
        p.add_argument("--align", default="t2s-interp", choices=ALIGNMENTS)
        p.add_argument(
            "--feature-reduction",
            default="mean",
            choices=FEATURE_REDUCTIONS,
            help="the feature term of eq. 13 over channels: 'mean' (default) or 'sum' (the "
            "paper's squared norm as written)",
        )
        p.add_argument("--lambda-kl", type=float, default=0.1)
        p.add_argument("--lambda-ratio", type=float, default=2.0)
        p.add_argument(
            "--ratio-on",
            default="decisions",
            choices=RATIO_ON,
            help="ratio loss on the sampled 'decisions' (the paper's eq. 9) or on the keep "
            "'probabilities' (beyond the paper: no sampling noise)",
        )
        p.add_argument("--alpha", type=float, default=1.0, help="paper: 2 on Occluded/Partial-REID")
        p.add_argument(
            "--token-guidance",
            default="none",
            choices=TOKEN_GUIDANCE,
            help="'rollout' / 'cls-attention' / 'attention-norm': the predictors learn the teacher's token "
            "importance (beyond the paper); 'none': the paper's recipe",
        )
        p.add_argument("--lambda-token", type=float, default=1.0, help="weight of loss_token")
        p.add_argument(
            "--lambda-occlusion",
            type=float,
            default=0.0,
            help="weight of loss_occlusion: the predictors learn to drop the occluder NODA "
            "pasted (needs NODA; beyond the paper; 0 = off)",
        )
        p.add_argument(
            "--hts-sampling",
            default=None,
            choices=HTS_SAMPLINGS,
            help="training decisions: 'gumbel' (default: the paper's per-token sampling), "
            "'gumbel-topk' (exactly k per stage, as inference) or 'topk' (the inference "
            "decisions; the paper's losses do not train the predictors then: for fine-tuning "
            "a trained HTS student, --init-from)",
        )
        p.add_argument(
            "--predictor-lr", type=float, default=None, help="HTS predictors' lr (default: --lr)"
        )
        p.add_argument(
            "--freeze-backbone-steps",
            type=int,
            default=0,
            help="steps at the start during which only the predictors learn",
        )
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--epochs", type=float, default=200)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per batch per device, before NODA"
    )
    p.add_argument("--num-instances", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.008)
    p.add_argument("--no-noda", action="store_true", help="turn NODA off")
    p.add_argument(
        "--occluders", default="builtin", help="'builtin' or a folder of occluder images"
    )
    p.add_argument(
        "--color-jitter", action="store_true", help="paper: on for Occluded/Partial-REID"
    )
    p.add_argument("--eval-every-epochs", type=int, default=0, help="0 = evaluate at the end only")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint-N folder to resume from, or 'latest': the newest complete one in "
        "--output-dir",
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    return p


def _load_teacher(path: str, image_size: tuple[int, int]):
    """The --teacher checkpoint, checked before any data is read or model built."""
    from .modeling_sureid import SureidModel

    try:
        teacher = SureidModel.from_pretrained(path)
    except (OSError, SureidError) as err:
        raise SureidError(f"--teacher {path}: {err}") from err
    size = tuple(teacher.config.image_size)
    if size != tuple(image_size):
        raise SureidError(
            f"--teacher {path} was trained at image size {size[0]}x{size[1]} but this run uses "
            f"{image_size[0]}x{image_size[1]} (--image-size): NPKD feeds both models the same "
            f"pixels. Pass --image-size {size[0]} {size[1]}, or a teacher of this size."
        )
    return teacher


def _from_timm(cls, a, overrides: dict):
    """The model from ImageNet weights; offline without a local file, name the two ways out."""
    try:
        return cls.from_timm(a.timm_model, checkpoint=a.imagenet_checkpoint, **overrides)
    except OSError as err:
        if a.imagenet_checkpoint is not None:
            raise
        raise SureidError(
            f"cannot download timm's ImageNet weights of {a.timm_model!r} "
            f"({err.__cause__ or err}); offline, pass --imagenet-checkpoint FILE (a local .pth "
            "or .safetensors of those weights) or --from-scratch (random initialisation)"
        ) from err


def _load_training_data(name: str, root: str, seed: int):
    from .data.datasets import load_reid_dataset

    if name == "synthetic":
        from .data.datasets import SYNTHETIC_META
        from .data.synthetic import make_synthetic_reid

        if not (Path(root) / SYNTHETIC_META).is_file():
            make_synthetic_reid(root, seed=seed)
    return load_reid_dataset(name, root)


class EvaluateEveryEpochs(TrainerCallback):
    """Evaluate at the end of every ``every``-th whole epoch (``--eval-every-epochs N``).

    ``eval_strategy="epoch"`` alone evaluates after every epoch whatever N is; this callback asks
    for an evaluation only at epochs N, 2N, ... (a partial last epoch, cut by ``max_steps``, is
    not a whole epoch: the run's final evaluation covers it).
    """

    def __init__(self, every: int):
        if every < 1:
            raise SureidError(
                f"--eval-every-epochs must be >= 1 (0 = at the end only), got {every}"
            )
        self.every = int(every)

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch or 0)
        if epoch > 0 and abs(state.epoch - epoch) < 1e-6 and epoch % self.every == 0:
            control.should_evaluate = True
        return control


_ENCODER_FIELDS = (
    "image_size",
    "patch_size",
    "stride_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "qkv_bias",
    "layer_norm_eps",
    "num_prefix_tokens",
    "neck",
    "neck_feat",
    "image_mean",
    "image_std",
)
_STUDENT_FIELDS = ("sparsify_layers", "keep_rate", "cls_reweight", "gumbel_tau", "hts_sampling")


def _load_init_from(path: str, image_size):
    """The --init-from checkpoint, checked before any data is read."""
    from .modeling_sureid import SureidModel

    try:
        source = SureidModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SureidError(f"--init-from {path}: {err}") from err
    size = tuple(source.config.image_size)
    if image_size is not None and tuple(image_size) != size:
        raise SureidError(
            f"--init-from {path} was trained at image size {size[0]}x{size[1]}, not "
            f"{image_size[0]}x{image_size[1]}: drop --image-size (the checkpoint's is used)"
        )
    return source


def _build_model(a, role: str, num_ids: int, source=None):
    """The model to train: from --init-from, from scratch, or from timm's ImageNet weights."""
    from .modeling_sureid import SureidStudentModel, SureidTeacherModel, init_from_pretrained

    cls = SureidTeacherModel if role == "teacher" else SureidStudentModel
    overrides: dict = {"num_identities": num_ids}
    if role == "student":
        overrides["keep_rate"] = a.keep_rate
        for key, value in (
            ("sparsify_layers", a.sparsify_layers),
            ("hts_sampling", a.hts_sampling),
        ):
            if value:
                overrides[key] = value
    if source is not None:
        names = _ENCODER_FIELDS + (_STUDENT_FIELDS if role == "student" else ())
        fields = {k: getattr(source.config, k) for k in names if hasattr(source.config, k)}
        model = cls(cls.config_class(**{**fields, **overrides}))
        report = init_from_pretrained(model, source)
        print(f"started from {a.init_from}; new (not in it or of another shape): {report['new']}")
        _check_topk_start(model, a, report["new"])
        return model
    model = _new_model(cls, a, overrides)
    # timm's weights have no predictors: every weight that matters here is new
    _check_topk_start(model, a, [name for name, _ in model.named_parameters()])
    return model


def _new_model(cls, a, overrides: dict):
    """A model from timm's ImageNet weights, or from scratch (--from-scratch)."""
    overrides["image_size"] = tuple(a.image_size)
    if a.stride:
        overrides["stride_size"] = a.stride
    if not a.from_scratch:
        return _from_timm(cls, a, overrides)
    for key, value in (
        ("hidden_size", a.hidden_size),
        ("num_hidden_layers", a.depth),
        ("num_attention_heads", a.heads),
        ("patch_size", a.patch_size),
    ):
        if value is not None:
            overrides[key] = value
    if a.patch_size and not a.stride:
        overrides["stride_size"] = a.patch_size
    return cls(cls.config_class(**overrides))


def _check_topk_start(model, a, new: list[str]) -> None:
    """--hts-sampling topk does not train the predictors (the mask carries no gradient):
    refuse it when they are new, unless token guidance teaches them."""
    if getattr(model.config, "hts_sampling", None) != "topk" or not _has_hts(model):
        return
    fresh = [name for name in new if name.startswith("predictors.")]
    if fresh and getattr(a, "token_guidance", "none") == "none":
        raise SureidError(
            "--hts-sampling topk trains with the predictors' own top-k and does not train "
            f"them, but these are new: {fresh[:3]}{' ...' if len(fresh) > 3 else ''}. Start "
            "from an HTS checkpoint whose predictors are trained (--init-from DIR), or train "
            "with --hts-sampling gumbel"
        )


def _training_arguments(a, role: str) -> SureidTrainingArguments:
    extra = {}
    if role == "student":
        extra = dict(
            align=a.align,
            feature_reduction=a.feature_reduction,
            lambda_kl=a.lambda_kl,
            lambda_ratio=a.lambda_ratio,
            ratio_on=a.ratio_on,
            alpha=a.alpha,
            token_guidance=a.token_guidance,
            lambda_token=a.lambda_token,
            lambda_occlusion=a.lambda_occlusion,
            predictor_learning_rate=a.predictor_lr,
            freeze_backbone_steps=a.freeze_backbone_steps,
        )
    return SureidTrainingArguments(
        output_dir=a.output_dir,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        num_instances=a.num_instances,
        learning_rate=a.lr,
        beta=a.beta,
        noda=not a.no_noda,
        occluders=a.occluders,
        color_jitter=a.color_jitter,
        dataloader_num_workers=a.workers,
        seed=a.seed,
        bf16=a.bf16,
        fp16=a.fp16,
        eval_strategy="no",  # EvaluateEveryEpochs below decides, honouring N
        save_strategy="epoch",
        save_total_limit=2,
        **extra,
    )


def _card_info(a, role: str, test_name: str, argv: list[str] | None) -> dict:
    """What the model card of a ``train_main`` run says beyond the trainer's own knowledge:
    the data sets, where the weights started (``base_model`` when that is a Hub repo: timm's
    ImageNet weights or an ``--init-from`` repo id) and the command."""
    import shlex
    import sys

    from .data.datasets import canonical_dataset_name
    from .model_card import hub_base_model, timm_hub_id

    def canonical(name):
        try:
            return canonical_dataset_name(name)
        except ValueError:
            return name

    if a.init_from:
        base, started = hub_base_model(a.init_from), f"the SUREID checkpoint {a.init_from}"
    elif a.from_scratch:
        base, started = None, "random weights (--from-scratch)"
    elif a.imagenet_checkpoint:
        base = None
        started = f"timm's {a.timm_model} ImageNet weights, read from {a.imagenet_checkpoint}"
    else:
        base, started = timm_hub_id(a.timm_model), f"timm's {a.timm_model} ImageNet weights"
    script = "examples/train_teacher.py" if role == "teacher" else "examples/train_distill.py"
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "dataset": canonical(a.dataset),
        "test_dataset": canonical(test_name),
        "base_model": base,
        "started_from": started,
        "command": shlex.join(["python", script, *args]),
    }


def train_main(argv: list[str] | None, role: str) -> dict:
    """Run the training recipe from command-line style arguments; returns the final metrics."""
    from .data.datasets import summary
    from .evaluation import protocol_for_dataset

    a = build_training_parser(role).parse_args(argv)
    # Checkpoints named on the command line fail now, not after the data and the model.
    source = _load_init_from(a.init_from, a.image_size) if a.init_from else None
    if a.image_size is None:
        a.image_size = tuple(source.config.image_size) if source is not None else (256, 128)
    teacher = None
    if role == "student" and a.teacher:
        teacher = _load_teacher(a.teacher, tuple(a.image_size))
    data = _load_training_data(a.dataset, a.data_root, a.seed)
    print(summary(data, print_table=False))
    test, test_name = data, a.dataset
    if a.test_dataset:
        if not a.test_root:
            raise SureidError("--test-dataset needs --test-root (where that data set lives)")
        test = _load_training_data(a.test_dataset, a.test_root, a.seed)
        test_name = a.test_dataset
    model = _build_model(a, role, len(set(data["train"]["pid"])), source)
    trainer = SureidTrainer(
        model=model,
        args=_training_arguments(a, role),
        train_dataset=data["train"],
        eval_dataset={"query": test["query"], "gallery": test["gallery"]},
        teacher=teacher,
        eval_protocol=protocol_for_dataset(test_name),
        callbacks=[EvaluateEveryEpochs(a.eval_every_epochs)] if a.eval_every_epochs else None,
    )
    trainer.model_card_info = _card_info(a, role, test_name, argv)
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(a.output_dir)  # weights and a card (without the final metrics yet)
    metrics = trainer.evaluate()
    trainer.write_model_card(a.output_dir)  # the card again, with this evaluation's metrics
    print(
        f"{role} on {test_name}: R1 {100 * metrics['eval_R1']:.1f}  mAP {100 * metrics['eval_mAP']:.1f}"
        f"  mINP {100 * metrics['eval_mINP']:.1f}  -> {a.output_dir}"
    )
    return metrics
