"""Training on ``transformers.Trainer``: a teacher (CE + triplet) or an HTS student with NPKD.

``SureidTrainer`` draws P identities x K images per batch (``IdentitySampler``), builds the NODA
batch (``NodaCollator``: each batch doubled, the copy with a pasted occluder), computes the
paper's loss (14) and logs every term and each stage's kept ratio. Its evaluation extracts
query / gallery features with the model in eval mode (true token dropping) and reports R1, mAP
and mINP. Crash-safe checkpoints: ``checkpointing``; the command line: ``sureid.cli.train``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import analysis
from .analysis import class_attention, resample_importance, token_importance
from .checkpointing import CheckpointingMixin, latest_checkpoint
from .configuration_sureid import SureidError
from .data.noda import build_train_collator
from .data.sampler import IdentitySampler
from .evaluation import evaluate_splits
from .inference import extract_features
from .losses import (
    ALIGNMENTS,
    cross_entropy_label_smooth,
    npkd_loss,
    ratio_loss,
    token_guidance_loss,
    triplet_loss,
)
from .model_card import build_model_card, write_model_card

logger = logging.getLogger(__name__)


@dataclass
class SureidTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's defaults and the SUREID loss / data options.

    Paper defaults: SGD momentum 0.9, lr 0.008, cosine decay (with a short linear warm-up),
    weight decay 1e-4, batch 64 = 16 identities x 4 images, 200 epochs, alpha = beta = 1,
    lambda_ratio 2, lambda_kl 0.1, T 1, NODA on. Every other field is ``TrainingArguments``'
    own, with its default, except ``remove_unused_columns``, which is always False: the
    collators read the data set's ``image``, ``pid``, ``camid`` and ``path`` columns, which the
    model's forward does not name. Loss (14): ``alpha (L_KD + lambda_ratio L_ratio) + beta
    (L_cls + L_tri)``; docs/method.md and docs/training.md give the terms. On the command line
    (``sureid train``) every field is a flag: ``--lambda-ratio 2``, ``--no-noda``.

    Args:
        learning_rate (`float`, *optional*, defaults to `0.008`):
            Peak learning rate (the paper's); flag alias ``--lr``.
        weight_decay (`float`, *optional*, defaults to `1e-4`):
            SGD weight decay.
        num_train_epochs (`float`, *optional*, defaults to `200`):
            Epochs (the paper's 200); ``max_steps`` > 0 overrides it; flag alias ``--epochs``.
        per_device_train_batch_size (`int`, *optional*, defaults to `64`):
            Images per batch before NODA doubles it: P identities x K images, so a multiple of
            ``num_instances``; flag alias ``--batch-size``.
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
        lambda_kl (`float`, *optional*, defaults to `0.1`):
            Weight of the KL term of the distillation loss (13).
        kd_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature T of the KL term, eq. (12).
        align (`str`, *optional*, defaults to `"t2s-interp"`):
            How teacher and student features are aligned in NPKD, one of ``losses.ALIGNMENTS``
            (interpolation or a linear projection, teacher-to-student or student-to-teacher:
            the paper's Table VI).
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
        lambda_token (`float`, *optional*, defaults to `0.0`):
            HTS students only; beyond the paper, 0 = off (the paper's recipe). Weight of
            ``loss_token``, which teaches each stage's predictor the top-k tokens of the
            teacher's class-token attention (without a teacher: of the dense model the student
            starts from).
        predictor_learning_rate (`float`, *optional*, defaults to `None`):
            Learning rate of the HTS predictors; None = `learning_rate`.

    Example:

    ```python
    >>> from sureid.trainer import SureidTrainingArguments
    >>> args = SureidTrainingArguments(output_dir="runs/student", alpha=2.0, color_jitter=True)
    >>> args.per_device_train_batch_size // args.num_instances  # identities per batch
    16
    ```
    """

    learning_rate: float = field(
        default=0.008, metadata={"help": "Peak learning rate (paper: 0.008).", "aliases": ["--lr"]}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay."})
    num_train_epochs: float = field(
        default=200, metadata={"help": "Epochs (paper: 200).", "aliases": ["--epochs"]}
    )
    per_device_train_batch_size: int = field(
        default=64,
        metadata={
            "help": "Images per batch per device before NODA doubles it (P x K).",
            "aliases": ["--batch-size"],
        },
    )
    per_device_eval_batch_size: int = field(
        default=128, metadata={"help": "Images per batch of the evaluation's extraction."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Linear warm-up: steps, or a fraction of all steps."}
    )
    optim: str = field(default="sgd", metadata={"help": "Paper: SGD."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Paper: 0.9."})
    save_strategy: str = field(default="epoch", metadata={"help": "When checkpoints are written."})
    # --- SUREID ---
    num_instances: int = field(default=4, metadata={"help": "K: images per identity in a batch."})
    alpha: float = field(
        default=1.0,
        metadata={
            "help": "Weight of L_KD + lambda_ratio L_ratio (paper: 2 on Occluded/Partial-REID)."
        },
    )
    beta: float = field(default=1.0, metadata={"help": "Weight of L_cls + L_tri."})
    lambda_ratio: float = field(default=2.0, metadata={"help": "Weight of the ratio loss (9)."})
    lambda_kl: float = field(default=0.1, metadata={"help": "Weight of the KL term in (13)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "T of eq. (12)."})
    align: str = field(
        default="t2s-interp", metadata={"help": f"NPKD feature alignment: one of {ALIGNMENTS}."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "0 = plain cross-entropy."})
    triplet_margin: float | None = field(
        default=0.3, metadata={"help": "Margin of the batch-hard triplet loss."}
    )
    noda: bool = field(
        default=True, metadata={"help": "Noise-occlusion data augmentation (--no-noda: off)."}
    )
    occluders: str = field(
        default="builtin", metadata={"help": "NODA's occluders: 'builtin' or a folder of images."}
    )
    color_jitter: bool = field(
        default=False, metadata={"help": "Colour jitter (paper: on for Occluded/Partial-REID)."}
    )
    random_erasing: float = field(default=0.5, metadata={"help": "Random erasing probability."})
    random_patch: float = field(default=0.5, metadata={"help": "Random patch probability."})
    lambda_token: float = field(
        default=0.0,
        metadata={
            "help": "HTS students: weight of the token-guidance loss, which teaches the "
            "predictors the teacher's class-token attention (beyond the paper; 0 = off)."
        },
    )
    predictor_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the HTS predictors (default: the learning rate)."},
    )

    def __post_init__(self):
        self.remove_unused_columns = False  # the collators read image, pid, camid, path
        super().__post_init__()
        if self.num_instances < 1 or self.per_device_train_batch_size % self.num_instances:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_instances ({self.num_instances}): a batch is P identities x K images"
            )
        if self.align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS}, got {self.align!r}")
        if not self.lambda_token >= 0:
            raise ValueError(f"lambda_token must be >= 0 (0 = off), got {self.lambda_token}")
        if self.predictor_learning_rate is not None and not self.predictor_learning_rate > 0:
            raise ValueError(
                f"predictor_learning_rate must be positive (or None), got "
                f"{self.predictor_learning_rate}"
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


class SureidTrainer(CheckpointingMixin, Trainer):
    """Trains a teacher (no ``teacher`` given) or distils an HTS student from a frozen teacher.

    ``train_dataset``: a ``datasets.Dataset`` with ``image``, ``pid`` (0..K-1), ``camid`` (a
    ``load_reid_dataset(...)["train"]``). ``eval_dataset``: a ``DatasetDict`` or dict with
    ``query`` and ``gallery`` splits. The teacher is put in eval mode with gradients off, moved
    to the student's device, and never saved into the student's checkpoints.
    ``check_token_selection``: ``evaluate`` also runs ``sureid.analysis.check_token_selection``
    on an HTS student (about ten more passes per evaluation batch; off by default).
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
        check_token_selection: bool = False,
        **kwargs,
    ):
        if not isinstance(args, SureidTrainingArguments):
            raise TypeError("SureidTrainer needs SureidTrainingArguments (the paper's defaults)")
        # Token guidance reads a dense model's attention: the teacher's, else that of a frozen
        # copy of the student as it starts (run densely).
        self.guide = None
        if has_hts(model) and args.lambda_token > 0 and teacher is None:
            self.guide = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs
        )
        self.reid_eval_dataset = eval_dataset
        self.eval_protocol = eval_protocol
        self.train_collator = train_collator
        self.check_token_selection = bool(check_token_selection)
        self.teacher = teacher
        self.align_projection = None
        if teacher is not None:
            self._set_teacher(model, teacher)
        self._terms: dict[str, float] = defaultdict(float)
        self._term_steps = 0
        # What the model card says beyond what the trainer knows (the command line fills it):
        # dataset, test_dataset, base_model, started_from, teacher, command; see
        # model_card.build_model_card.
        self.model_card_info: dict = {}
        self._last_evaluation: dict | None = None  # metrics and the step they were measured at

    def _set_teacher(self, model: nn.Module, teacher: nn.Module) -> None:
        """Freeze the teacher; check it fits the student; the linear alignments' projection."""
        teacher.eval().requires_grad_(False)
        s_ids = getattr(model.config, "num_identities", 0)
        t_ids = getattr(teacher.config, "num_identities", 0)
        if s_ids != t_ids:
            raise SureidError(
                f"student has num_identities={s_ids} but the teacher {t_ids}: NPKD's KL term "
                "compares their logits, so both must be trained on the same identities"
            )
        if self.args.align.endswith("linear"):
            c_s, c_t = model.config.hidden_size, teacher.config.hidden_size
            dims = (c_t, c_s) if self.args.align == "t2s-linear" else (c_s, c_t)
            self.align_projection = nn.Linear(*dims)
            self.add_callback(_ClearProjectionGrad(self.align_projection))

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
        stage's predictor the top-k of the teacher's class-token attention (without a teacher:
        the guide's), read from the teacher pass NPKD already makes. Every term is logged.
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
        guided = bool(out.keep_logits) and args.lambda_token > 0
        hts = 0.0
        if out.keep_masks:
            cfg = self._unwrapped().config
            targets = [k / cfg.num_patches for k in cfg.stage_keep_counts]
            terms["ratio"] = ratio_loss(out.keep_masks, targets)
            hts = args.lambda_ratio * terms["ratio"]
        attentions = None
        if self.teacher is not None:
            terms.update(self._distillation_terms(pixels, out, guided))
            attentions = terms.pop("attentions")
            loss = loss + args.alpha * (terms["kd"] + hts)
        elif out.keep_masks:
            loss = loss + args.alpha * hts
        if guided:
            terms["token"] = self._guidance_term(pixels, out, attentions)
            loss = loss + args.lambda_token * terms["token"]
        terms["total"] = loss
        self._check_finite(terms)
        self._record(terms, out.keep_masks)
        return (loss, out) if return_outputs else loss

    def _distillation_terms(self, pixels, out, guided: bool) -> dict:
        """NPKD (13) against the frozen teacher: ``kl``, ``feat``, ``kd``; and the teacher's
        attention (``attentions``) when token guidance reads it."""
        args: SureidTrainingArguments = self.args
        teacher = self._on_device(self.teacher, pixels.device)
        with torch.no_grad():
            t_out = teacher(pixel_values=pixels, output_attentions=guided)
        kd = npkd_loss(
            out.features,
            t_out.features,
            out.logits,
            t_out.logits,
            lambda_kl=args.lambda_kl,
            temperature=args.kd_temperature,
            align=args.align,
            projection=self.align_projection,
        )
        return {"kl": kd["kl"], "feat": kd["feat"], "kd": kd["kd"], "attentions": t_out.attentions}

    def _guidance_term(self, pixels, out, attentions) -> torch.Tensor:
        """``L_token``: each stage's predictor learns the top-k of the class-token attention of
        the teacher (``attentions``, from its NPKD pass) or, without one, of the guide."""
        source = self.teacher if self.teacher is not None else self.guide
        if attentions is not None:
            importance = class_attention(attentions, source.config.num_prefix_tokens)
        else:
            guide = self._on_device(self.guide, pixels.device)
            importance = token_importance(guide, pixels, "cls-attention")
        cfg = self._unwrapped().config
        importance = resample_importance(importance, source.config.grid_size, cfg.grid_size)
        return token_guidance_loss(
            out.keep_logits, out.keep_masks, importance, cfg.stage_keep_counts
        )

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

    # -- the model card -----------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (never with NaN/inf weights: ``CheckpointingMixin``); the final save
        (not a checkpoint's) also writes the model card, ``README.md`` (``write_model_card``)."""
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
        skip = {"per_device_eval_batch_size", "save_strategy"}
        if self.teacher is None:
            skip |= {"lambda_kl", "kd_temperature", "align"}
        if not has_hts(self._unwrapped()):
            skip |= {"lambda_ratio", "lambda_token", "predictor_learning_rate"}
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

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """R1 / R5 / mAP / mINP on query vs gallery, the model in eval mode (true dropping).

        Returns (and logs) ``{prefix}_R1``, ``{prefix}_R5``, ``{prefix}_mAP`` and
        ``{prefix}_mINP`` as fractions in [0, 1], computed as ``evaluation.evaluate_model`` does
        (``extract_features``, then ``evaluate_splits`` under ``eval_protocol``). With
        ``check_token_selection`` and an HTS student, also the predictor check
        (``analysis.check_token_selection`` against the teacher, or without one the guide):
        ``{prefix}_random_R1`` / ``_random_mAP`` (as many
        tokens kept at random, mean of 5 draws; ``_random_R1_min`` / ``_max`` over the draws),
        ``_guide_R1`` / ``_guide_mAP`` (the guide's rollout top-k), ``_spearman`` and, with
        visible-body masks in the query split, ``_body_share`` / ``_body_chance`` and
        ``_body_auc`` / ``_guide_body_auc``.
        """
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
        if self.check_token_selection and has_hts(model):
            metrics.update(self._token_selection_metrics(model, data, metric_key_prefix))
        if metric_key_prefix == "eval" and eval_dataset is None:  # what the model card reports
            self._last_evaluation = {"metrics": dict(metrics), "step": self.state.global_step}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def _token_selection_metrics(self, model, data, prefix: str) -> dict[str, float]:
        guide = self.teacher if self.teacher is not None else self.guide
        check = analysis.check_token_selection(
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


class _ClearProjectionGrad(TrainerCallback):
    """Clears the alignment projection's gradient after each optimizer step.

    ``transformers.Trainer`` zeroes (and clips) the gradients of the model's parameters only;
    the projection is trained with the student but is not part of it, so without this its
    gradient would add up over the steps.
    """

    def __init__(self, projection: nn.Module):
        self.projection = projection

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projection.zero_grad(set_to_none=True)


def has_hts(model: nn.Module) -> bool:
    """Whether ``model`` is a student whose token sparsification runs (keep rate below 1)."""
    return bool(getattr(getattr(model, "config", None), "hts_enabled", False))


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
