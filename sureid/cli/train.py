"""``sureid train teacher|student``: the training recipe on the command line.

One source for the options: the flags are built by ``transformers.HfArgumentParser`` from
``SureidTrainingArguments`` (every training field, help from its metadata, plus
``TrainingArguments``' own) and from the dataclasses below (data, model, student). The same
command runs as ``accelerate launch examples/train_distill.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainerCallback

from ..configuration_sureid import HTS_SAMPLINGS, SureidError
from ..trainer import SureidTrainer, SureidTrainingArguments

ROLES = ("teacher", "student")
_DEFAULT_TIMM = {"teacher": "vit_base_patch16_224", "student": "deit_small_distilled_patch16_224"}


@dataclass
class DataArguments:
    """What to train and test on."""

    dataset: str = field(
        metadata={"help": "market1501, dukemtmc, occluded_duke, folder, synthetic, ..."}
    )
    data_root: str = field(metadata={"help": "Folder holding the data set (made for synthetic)."})
    test_dataset: str | None = field(
        default=None, metadata={"help": "Evaluate on another data set (cross-domain)."}
    )
    test_root: str | None = field(default=None, metadata={"help": "Where --test-dataset lives."})


@dataclass
class ModelArguments:
    """Where the weights start, and the run's own switches."""

    timm_model: str | None = field(
        default=None,
        metadata={"help": "ImageNet ViT/DeiT to start from (default: ViT-B/16 / DeiT-S)."},
    )
    imagenet_checkpoint: str | None = field(
        default=None, metadata={"help": ".pth/.safetensors of those weights; omitted: download."}
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Random initialisation instead of ImageNet weights."}
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SUREID checkpoint (folder or hub id): its architecture and "
            "every weight that fits (new classifier when the identities differ)."
        },
    )
    image_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "H W (default 256 128; with --init-from the checkpoint's).",
            "metavar": ("H", "W"),
        },
    )
    patch_size: int | None = field(default=None, metadata={"help": "From scratch only (16)."})
    stride: int | None = field(default=None, metadata={"help": "Patch stride (12: overlapping)."})
    hidden_size: int | None = field(default=None, metadata={"help": "From scratch only."})
    depth: int | None = field(default=None, metadata={"help": "From scratch only."})
    heads: int | None = field(default=None, metadata={"help": "From scratch only."})
    eval_every_epochs: int = field(
        default=0, metadata={"help": "Evaluate every N epochs (0: at the end only)."}
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "checkpoint-N folder to resume from, or 'latest' in --output-dir."},
    )


@dataclass
class StudentArguments:
    """The student's token sparsification and its teacher."""

    teacher: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint folder (omitted: no NPKD)."}
    )
    keep_rate: float = field(default=0.7, metadata={"help": "p: stage j keeps p^(j+1)."})
    sparsify_layers: list[int] | None = field(
        default=None, metadata={"help": "0-based blocks the predictors run before (3 6 9)."}
    )
    hts_sampling: str | None = field(
        default=None,
        metadata={
            "help": "Training decisions: 'gumbel' (default, the paper's) or 'gumbel-topk'.",
            "choices": HTS_SAMPLINGS,
        },
    )
    check_token_selection: bool = field(
        default=False,
        metadata={"help": "Also run the token-selection check in each evaluation."},
    )


def build_training_parser(role: str) -> HfArgumentParser:
    """The options of ``sureid train ROLE`` (and of examples/train_*.py)."""
    if role not in ROLES:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    types = [DataArguments, ModelArguments, SureidTrainingArguments]
    if role == "student":
        types.insert(2, StudentArguments)
    parser = HfArgumentParser(
        types,
        prog=f"sureid train {role}",
        description=f"Train a SUREID {role} (paper defaults; see docs/training.md).",
    )
    parser.set_defaults(
        timm_model=_DEFAULT_TIMM[role], dataloader_num_workers=4, save_total_limit=2
    )
    return parser


def parse_training_arguments(argv: list[str], role: str):
    """(``a``, ``SureidTrainingArguments``): the run's options as one namespace ``a`` (data,
    model, student and ``output_dir``), and the training arguments."""
    parser = build_training_parser(role)
    asks_help = any(arg in ("-h", "--help") for arg in argv)  # help first, as argparse does
    if not asks_help and not any(
        arg.split("=")[0] in ("--output-dir", "--output_dir") for arg in argv
    ):
        parser.error("the following arguments are required: --output-dir")
    *parts, training = parser.parse_args_into_dataclasses(args=argv)
    a = argparse.Namespace(output_dir=training.output_dir)
    for part in parts:
        vars(a).update(vars(part))
    if a.image_size is not None and len(a.image_size) != 2:
        parser.error(f"--image-size takes two numbers, H W; got {a.image_size}")
    for name in ("teacher", "keep_rate", "sparsify_layers", "hts_sampling"):
        vars(a).setdefault(name, None)
    vars(a).setdefault("check_token_selection", False)
    return a, training


def _load_teacher(path: str, image_size: tuple[int, int]):
    """The --teacher checkpoint, checked before any data is read or model built."""
    from ..modeling_sureid import SureidModel

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
    from ..data.datasets import SYNTHETIC_META, load_reid_dataset
    from ..data.synthetic import make_synthetic_reid

    if name == "synthetic":
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
    from ..modeling_sureid import SureidModel

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
    from ..modeling_sureid import SureidStudentModel, SureidTeacherModel, init_from_pretrained

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
        return model
    return _new_model(cls, a, overrides)


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


def _card_info(a, role: str, test_name: str, argv: list[str] | None) -> dict:
    """What the model card of a ``train_main`` run says beyond the trainer's own knowledge:
    the data sets, where the weights started (``base_model`` when that is a Hub repo: timm's
    ImageNet weights or an ``--init-from`` repo id) and the command."""
    import shlex
    import sys

    from ..data.datasets import canonical_dataset_name
    from ..model_card import hub_base_model, timm_hub_id

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
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "dataset": canonical(a.dataset),
        "test_dataset": canonical(test_name),
        "base_model": base,
        "started_from": started,
        "command": shlex.join(["sureid", "train", role, *args]),
    }


def train_main(argv: list[str] | None, role: str) -> dict:
    """Run the training recipe from command-line style arguments; returns the final metrics."""
    from ..checkpointing import resolve_resume
    from ..data.datasets import summary
    from ..evaluation import protocol_for_dataset
    from ..paths import check_output_folder

    argv = list(sys.argv[1:] if argv is None else argv)
    a, training = parse_training_arguments(argv, role)
    # The output folder, the resume point and the checkpoints named on the command line fail
    # now, not after the data and the model (the trainer says "resuming from ..." when it
    # starts; this only checks).
    check_output_folder(a.output_dir, "--output-dir")
    resolve_resume(a.resume, a.output_dir, log=False)
    source = _load_init_from(a.init_from, a.image_size) if a.init_from else None
    if a.image_size is None:
        a.image_size = tuple(source.config.image_size) if source is not None else (256, 128)
    teacher = _load_teacher(a.teacher, tuple(a.image_size)) if a.teacher else None
    data = _load_training_data(a.dataset, a.data_root, training.seed)
    print(summary(data, print_table=False))
    test, test_name = data, a.dataset
    if a.test_dataset:
        if not a.test_root:
            raise SureidError("--test-dataset needs --test-root (where that data set lives)")
        test = _load_training_data(a.test_dataset, a.test_root, training.seed)
        test_name = a.test_dataset
    model = _build_model(a, role, len(set(data["train"]["pid"])), source)
    trainer = SureidTrainer(
        model=model,
        args=training,
        train_dataset=data["train"],
        eval_dataset={"query": test["query"], "gallery": test["gallery"]},
        teacher=teacher,
        eval_protocol=protocol_for_dataset(test_name),
        check_token_selection=a.check_token_selection,
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
