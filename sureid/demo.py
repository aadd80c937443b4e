"""The demo (`sureid demo`, `make demo`): the paper's Table IV in miniature, on CPU.

Generates the built-in synthetic occluded set; loads the demo backbone (a small dense ViT
pretrained on a second synthetic set of *other* people: the offline stand-in for the ImageNet
weights the paper starts from, made by ``pretrain_backbone`` /
``tools/make_demo_backbone.py`` and shipped in ``sureid/assets``); trains a teacher and a
dense student from it; then the HTS students, fine-tuned from the dense student as DynamicViT
does (+HTS, +HTS+NPKD, +HTS+NPKD+NODA); evaluates each (R1 / mAP, true token dropping at test
time), measures its images/s side by side, checks what each HTS student's predictors learned
(``analysis.check_token_selection``), and writes a markdown report, the kept-token figure and
the checkpoints into an output folder. The steps are functions (``prepare_data``,
``train_teacher``, ``train_student``, ``measure``, ``write_report``) that
``research/demo_ablation.py`` recombines for the studies in research/notes.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .benchmark import time_round_robin
from .configuration_sureid import SureidStudentConfig, SureidTeacherConfig
from .modeling_sureid import SureidStudentModel, SureidTeacherModel

# The demo's training as overrides of ``SureidTrainingArguments`` (its fields, not copies of
# them): every model the demo trains uses these; each row then sets its epochs, NODA and
# teacher. The paper's SGD recipe assumes a long schedule; in the demo's few steps these small
# ViTs move far faster with AdamW. Batch: 8 identities x 4 images. The predictors learn ten
# times faster than the rest (DynamicViT's fine-tuning; research/notes says what it measured).
DEMO_TRAINING = {
    "optim": "adamw_torch",
    "optim_args": None,
    "learning_rate": 5e-4,
    "weight_decay": 0.05,
    "warmup_steps": 0.1,
    "per_device_train_batch_size": 32,
    "num_instances": 4,
    "predictor_learning_rate": 5e-3,
}


@dataclass
class DemoSettings:
    """Sizes aimed at under ten minutes on 2 idle CPU cores (docs/training.md#the-demo).

    128x64 images with patch 8 give 128 image tokens, as DeiT-S has at 256x128 with patch 16,
    so HTS drops as many tokens per stage as in the paper. ``backbone``: the pretrained encoder
    the dense student starts from: ``"builtin"`` (the file in ``sureid/assets``), a path made by
    ``pretrain_backbone``, or None (random weights). ``teacher_backbone``: the same for the
    teacher, which is twice as wide (as the paper distils ViT-B into DeiT-S).
    ``hts_init``: ``"dense"`` trains a dense student first (``student_epochs``) and fine-tunes
    every row from it (``hts_epochs``; HTS rows as DynamicViT fine-tunes a trained DeiT, the
    dense row too, so every row gets the same budget); ``"backbone"`` trains every row from the
    backbone (``student_epochs``). ``hts_sampling``: the students' config field of that name.
    ``training``: overrides of ``SureidTrainingArguments`` for every model the demo trains
    (default ``DEMO_TRAINING``; e.g. ``{"lambda_token": 1.0}`` adds token guidance).
    """

    out_dir: str = "sureid-demo"
    seed: int = 0
    train_ids: int = 64
    test_ids: int = 64
    backbone: str | None = "builtin"
    teacher_backbone: str | None = "builtin"
    image_size: tuple[int, int] = (128, 64)
    patch_size: int = 8  # 16 x 8 = 128 image tokens
    student_hidden: int = 96
    student_heads: int = 3
    teacher_hidden: int = 192
    teacher_heads: int = 6
    depth: int = 6
    sparsify_layers: tuple[int, ...] = (1, 3, 5)
    keep_rate: float = 0.7
    hts_sampling: str = "gumbel"
    teacher_epochs: float = 10
    teacher_noda: bool = True
    student_epochs: float = 6
    hts_init: str = "dense"
    # 8, not 4: with 4 the paper's recipe kept the background in the last stage on one seed of
    # three, and every HTS row scored lower (research/notes).
    hts_epochs: float = 8
    training: dict = field(default_factory=lambda: dict(DEMO_TRAINING))
    timing_batch: int = 32
    timing_repeats: int = 10
    timing_round_seconds: float = 0.3
    threads: int = 0
    rows: tuple[str, ...] = ("dense", "hts", "hts+npkd", "hts+npkd+noda")


def quick_settings(**overrides) -> DemoSettings:
    """Tiny sizes, one epoch each, no backbone: every step of the demo in seconds (``--quick``,
    tests); the numbers mean nothing. ``overrides`` set any other field."""
    fields = dict(
        train_ids=8,
        test_ids=4,
        image_size=(64, 32),
        patch_size=8,
        student_hidden=32,
        teacher_hidden=32,
        student_heads=2,
        teacher_heads=2,
        depth=4,
        sparsify_layers=(1, 2, 3),
        backbone=None,
        teacher_backbone=None,
        teacher_epochs=1,
        student_epochs=1,
        hts_epochs=1,
        training={**DEMO_TRAINING, "per_device_train_batch_size": 8, "num_instances": 2},
        timing_batch=4,
        timing_repeats=1,
        timing_round_seconds=0.0,
    )
    return DemoSettings(**{**fields, **overrides})


@dataclass(frozen=True)
class RowSpec:
    """One student row of the table: its label and what its training adds."""

    label: str
    hts: bool  # prunes tokens (keep_rate from the settings)
    distil: bool  # NPKD from the teacher
    noda: bool  # noise-occlusion data augmentation


ROWS = {
    "dense": RowSpec("DeiT-S-like student, dense", hts=False, distil=False, noda=False),
    "hts": RowSpec("+ HTS", hts=True, distil=False, noda=False),
    "hts+npkd": RowSpec("+ HTS + NPKD", hts=True, distil=True, noda=False),
    "hts+npkd+noda": RowSpec("+ HTS + NPKD + NODA (SUREID)", hts=True, distil=True, noda=True),
}


@dataclass
class Trained:
    """A model the demo trained (or loaded), with what the report says about its training."""

    key: str
    label: str
    model: torch.nn.Module
    keep_rate: float
    train_seconds: float
    last_log: dict = field(default_factory=dict)


@dataclass
class DemoRow:
    name: str
    keep_rate: float
    tokens_last_stage: int
    rank1: float
    mAP: float
    images_per_second: float
    ms_per_batch: float
    train_seconds: float
    check: dict | None = None  # analysis.TokenSelectionCheck.summary() of an HTS student
    extra: dict = field(default_factory=dict)
    # over the first row with keep rate 1 (the dense student): median of the timed rounds'
    # ratios, and their lowest and highest
    speedup: float | None = None
    speedup_range: tuple[float, float] | None = None


def _encoder_kwargs(s: DemoSettings) -> dict:
    return dict(
        image_size=s.image_size,
        patch_size=s.patch_size,
        stride_size=s.patch_size,
        num_hidden_layers=s.depth,
        drop_path_rate=0.05,
    )


def training_arguments(s: DemoSettings, out: Path, **fields):
    """``SureidTrainingArguments`` writing to ``out`` with the demo's training (``s.training``);
    ``fields`` set the rest (schedule length, NODA, logging) and may override ``s.training``.
    The research probes train with it too, so they train as the demo does."""
    from .trainer import SureidTrainingArguments

    base = {"save_strategy": "no", "seed": s.seed, "report_to": "none"}
    return SureidTrainingArguments(output_dir=str(out), **{**base, **s.training, **fields})


def _train(model, data, s: DemoSettings, out: Path, epochs: float, teacher=None, noda=False):
    """Train ``model`` with the demo's training; save it into ``out``; (seconds, last log)."""
    from .trainer import SureidTrainer

    args = training_arguments(
        s,
        out,
        num_train_epochs=epochs,
        noda=noda,
        logging_strategy="epoch",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        log_level="warning",
    )
    trainer = SureidTrainer(model=model, args=args, train_dataset=data["train"], teacher=teacher)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return seconds, logs[-1] if logs else {}


BUILTIN_BACKBONE = Path(__file__).parent / "assets" / "demo_backbone.safetensors"
BUILTIN_TEACHER_BACKBONE = Path(__file__).parent / "assets" / "demo_teacher_backbone.safetensors"
_BACKBONE_FIELDS = ("image_size", "patch_size", "hidden_size", "num_attention_heads", "depth")
BACKBONE_ROLES = ("student", "teacher")


def _backbone_shape(s: DemoSettings, role: str = "student") -> dict:
    """What a backbone file must match: the students' (or the teacher's) encoder shape."""
    if role not in BACKBONE_ROLES:
        raise ValueError(f"role must be one of {BACKBONE_ROLES}, got {role!r}")
    teacher = role == "teacher"
    return dict(
        image_size=list(s.image_size),
        patch_size=s.patch_size,
        hidden_size=s.teacher_hidden if teacher else s.student_hidden,
        num_attention_heads=s.teacher_heads if teacher else s.student_heads,
        depth=s.depth,
    )


def pretrain_backbone(
    out_file: str | Path,
    settings: DemoSettings | None = None,
    *,
    steps: int = 4000,
    num_ids: int = 256,
    seed: int = 1000,
    learning_rate: float = 1e-3,
    work_dir: str | Path | None = None,
    role: str = "student",
    log=print,
) -> Path:
    """Train the dense ViT the demo's models start from and save its encoder to ``out_file``.

    The offline stand-in for ImageNet weights: ``pretrain_dense_model``'s model, saved as
    float16 safetensors with the shape and recipe in its metadata.
    """
    from safetensors.torch import save_file

    out_file = Path(out_file)
    work = Path(work_dir) if work_dir else out_file.parent / (out_file.stem + "_work")
    model, seconds = pretrain_dense_model(
        settings,
        steps=steps,
        num_ids=num_ids,
        seed=seed,
        learning_rate=learning_rate,
        work_dir=work,
        role=role,
        log=log,
    )
    shape = _backbone_shape(settings or DemoSettings(), role)
    recipe = dict(steps=steps, num_ids=num_ids, seed=seed, learning_rate=learning_rate)
    meta = {"shape": json.dumps(shape), "recipe": json.dumps(recipe), "seconds": f"{seconds:.0f}"}
    tensors = {
        k: v.detach().to(torch.float16).contiguous() for k, v in model.encoder.state_dict().items()
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=meta)
    log(f"saved {out_file} ({seconds / 60:.1f} min)")
    return out_file


# The backbone's pretraining (what ``pretrain_dense_model`` does not take as an argument).
_BACKBONE_TRAINING = dict(
    optim="adamw_torch",
    optim_args=None,
    weight_decay=0.05,
    warmup_steps=0.05,
    noda=False,
    save_strategy="no",
    report_to="none",
    log_level="warning",
)


def pretrain_dense_model(
    settings: DemoSettings | None = None,
    *,
    steps: int = 4000,
    num_ids: int = 256,
    seed: int = 1000,
    learning_rate: float = 1e-3,
    work_dir: str | Path,
    role: str = "student",
    num_prefix_tokens: int = 1,
    log=print,
) -> tuple[SureidTeacherModel, float]:
    """The demo backbone's training: a dense model of the students' shape (width, heads, depth,
    image size, patch; ``role="teacher"``: the teacher's width and heads) trained from random
    weights with CE + triplet, no NODA, on a synthetic set of ``num_ids`` *other* people
    (``seed`` differs from the demo's, so no demo identity, test or train, is in it; the demo
    refuses to run with the backbone's seed). ``num_prefix_tokens=2`` adds a second prefix
    token that the head never reads (a "register", as ``research/register_probe.py`` studies).
    Returns the model (eval mode) and the training's seconds.
    """
    from .data.datasets import load_reid_dataset
    from .data.synthetic import make_synthetic_reid
    from .trainer import SureidTrainer, SureidTrainingArguments

    s = settings or DemoSettings()
    if seed == s.seed:
        raise ValueError(
            f"the backbone's seed ({seed}) must differ from the demo's ({s.seed}): it has to be "
            "trained on other people than the demo's train and test identities"
        )
    work = Path(work_dir)
    root = make_synthetic_reid(
        work / "data", num_train_ids=num_ids, num_test_ids=2, seed=seed, size=s.image_size
    )
    data = load_reid_dataset("synthetic", root)
    shape = _backbone_shape(s, role)
    torch.manual_seed(seed)
    model = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s),
            hidden_size=shape["hidden_size"],
            num_attention_heads=shape["num_attention_heads"],
            num_identities=len(set(data["train"]["pid"])),
            num_prefix_tokens=num_prefix_tokens,
        )
    )
    batch = {k: s.training[k] for k in ("per_device_train_batch_size", "num_instances")}
    args = SureidTrainingArguments(
        output_dir=str(work / "run"),
        max_steps=steps,
        learning_rate=learning_rate,
        logging_steps=max(1, steps // 20),
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        **batch,
        **_BACKBONE_TRAINING,
    )
    log(
        f"pretraining the demo's {role} backbone: {steps} steps on {num_ids} synthetic people "
        f"(seed {seed})"
    )
    start = time.perf_counter()
    SureidTrainer(model=model, args=args, train_dataset=data["train"]).train()
    return model.eval(), time.perf_counter() - start


def load_backbone(path: str | Path, s: DemoSettings, role: str = "student") -> dict:
    """Read a backbone file and check it fits ``s`` (the students' shape, or the teacher's) and
    was pretrained on other people than the demo's (another seed); returns its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo backbone {path} not found; make one with tools/make_demo_backbone.py "
            "or run the demo with backbone=None (random weights)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"demo backbone {path} is not a readable safetensors file ({err}); remake it with "
            "tools/make_demo_backbone.py"
        ) from err
    shape = json.loads(meta.get("shape", "{}"))
    want = _backbone_shape(s, role)
    if shape != want:
        diff = {k: (shape.get(k), want[k]) for k in _BACKBONE_FIELDS if shape.get(k) != want[k]}
        raise ValueError(
            f"demo backbone {path} was made for another shape ({diff}, as (file, settings)); "
            "make one for these settings with pretrain_backbone, or set backbone=None"
        )
    recipe = json.loads(meta.get("recipe", "{}"))
    if recipe.get("seed") == s.seed:
        raise ValueError(
            f"demo backbone {path} was pretrained on the synthetic people of seed {s.seed}, the "
            f"demo's own seed: its train identities would be the demo's. Run the demo with "
            "another --seed"
        )
    description = (
        f"pretrained {recipe.get('steps', '?')} steps on {recipe.get('num_ids', '?')} other "
        f"synthetic people, seed {recipe.get('seed', '?')}"
    )
    return {"tensors": tensors, "description": description}


def _builtin_backbone(role: str) -> Path:
    """The backbone file shipped in ``sureid/assets`` for the students or the teacher."""
    return BUILTIN_TEACHER_BACKBONE if role == "teacher" else BUILTIN_BACKBONE


def backbone_model(
    path: str | Path | None = None, settings: DemoSettings | None = None, role: str = "student"
) -> SureidTeacherModel:
    """The backbone alone as a dense model (fresh, identity-like BNNeck), in eval mode: the
    students' (or, ``role="teacher"``, the teacher's) shape; ``path`` defaults to the built-in
    backbone of that role."""
    s = settings or DemoSettings()
    shape = _backbone_shape(s, role)
    if path is None:
        path = _builtin_backbone(role)
    model = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s),
            hidden_size=shape["hidden_size"],
            num_attention_heads=shape["num_attention_heads"],
        )
    )
    _init_from(model, load_backbone(path, s, role))
    return model.eval()


def _init_from(model, pretrained: dict | None) -> bool:
    """Copy the backbone into ``model``'s encoder when the shapes match (the paper's students
    start from ImageNet DeiT-S the same way); the head and the predictors stay new."""
    if pretrained is None:
        return False
    source = pretrained["tensors"]
    target = model.encoder.state_dict()
    if source.keys() != target.keys() or any(source[k].shape != target[k].shape for k in source):
        return False
    model.encoder.load_state_dict(source)
    return True


def _evaluate(model, data) -> tuple[float, float]:
    from .evaluation import evaluate_model

    result = evaluate_model(model, data["query"], data["gallery"], progress=False).metrics
    return result.rank(1), result.mAP


# --------------------------------------------------------------------------------------------
# The demo's steps
# --------------------------------------------------------------------------------------------


def check_settings(s: DemoSettings) -> None:
    """Raise a ValueError naming the field when the settings cannot run."""
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown demo rows {unknown}; choose from {list(ROWS)}")
    if s.hts_init not in ("dense", "backbone"):
        raise ValueError(f"hts_init must be 'dense' or 'backbone', got {s.hts_init!r}")
    from dataclasses import fields

    from .trainer import SureidTrainingArguments

    known = {f.name for f in fields(SureidTrainingArguments)}
    unknown = sorted(set(s.training) - known)
    if unknown:
        raise ValueError(
            f"DemoSettings.training has {unknown}, which SureidTrainingArguments does not: "
            "use its field names (docs/training.md lists the SUREID ones)"
        )


def prepare_data(s: DemoSettings, out: Path, log=print):
    """Generate (or reuse) the synthetic occluded set in ``out/data`` and load it."""
    from .data.datasets import load_reid_dataset, summary
    from .data.synthetic import make_synthetic_reid

    log(f"[1/5] synthetic occluded set -> {out / 'data'}")
    root = make_synthetic_reid(
        out / "data",
        num_train_ids=s.train_ids,
        num_test_ids=s.test_ids,
        seed=s.seed,
        size=s.image_size,
        overwrite=True,
    )
    data = load_reid_dataset("synthetic", root)
    log(summary(data, print_table=False))
    return data


def load_pretrained(
    s: DemoSettings, role: str = "student", log=print
) -> tuple[dict | None, Path | None]:
    """The student's (or the teacher's) backbone: its tensors and path, or (None, None)."""
    choice = s.teacher_backbone if role == "teacher" else s.backbone
    if choice is None:
        log(f"  {role}: no backbone, random weights")
        return None, None
    path = _builtin_backbone(role) if choice == "builtin" else Path(choice)
    pretrained = load_backbone(path, s, role)
    log(f"  {role} backbone: {path} ({pretrained['description']})")
    return pretrained, path


def train_teacher(s: DemoSettings, data, pretrained, out: Path, log=print) -> Trained:
    """The dense teacher, from its backbone (``pretrained``: ``load_pretrained(s, "teacher")``)."""
    num_ids = len(set(data["train"]["pid"]))
    noda = "NODA" if s.teacher_noda else "no NODA"
    log(f"[3/5] teacher (hidden {s.teacher_hidden}, {s.teacher_epochs:g} epochs, {noda})")
    torch.manual_seed(s.seed)
    teacher = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s),
            hidden_size=s.teacher_hidden,
            num_attention_heads=s.teacher_heads,
            num_identities=num_ids,
        )
    )
    _init_from(teacher, pretrained)
    seconds, last = _train(teacher, data, s, out / "teacher", s.teacher_epochs, noda=s.teacher_noda)
    teacher.eval()
    label = f"teacher (hidden {s.teacher_hidden})"
    return Trained("teacher", label, teacher, 1.0, seconds, last)


def train_student(
    key: str,
    s: DemoSettings,
    data,
    out: Path,
    *,
    start_from=None,
    pretrained: dict | None = None,
    teacher=None,
    name: str | None = None,
    log=print,
) -> Trained:
    """One student row: a new student, started from ``start_from`` (a trained SUREID model:
    everything but new predictors; ``hts_epochs``) or else the backbone (``student_epochs``),
    trained as ``ROWS[key]`` says and saved in ``out/name`` (default: the key)."""
    from .modeling_sureid import init_from_pretrained

    spec = ROWS[key]
    keep = s.keep_rate if spec.hts else 1.0
    num_ids = len(set(data["train"]["pid"]))
    torch.manual_seed(s.seed + 1)  # every student starts from the same weights
    student = SureidStudentModel(
        SureidStudentConfig(
            **_encoder_kwargs(s),
            hidden_size=s.student_hidden,
            num_attention_heads=s.student_heads,
            sparsify_layers=s.sparsify_layers,
            keep_rate=keep,
            hts_sampling=s.hts_sampling,
            num_identities=num_ids,
        )
    )
    if start_from is not None:
        init_from_pretrained(student, start_from)
    else:
        _init_from(student, pretrained)
    epochs = s.hts_epochs if start_from is not None else s.student_epochs
    origin = "the dense start" if start_from is not None else "the backbone"
    log(f"  - {spec.label} ({epochs:g} epochs from {origin})")
    seconds, last = _train(
        student,
        data,
        s,
        out / (name or key.replace("+", "_")),
        epochs,
        teacher=teacher if spec.distil else None,
        noda=spec.noda,
    )
    student.eval()
    return Trained(key, spec.label, student, keep, seconds, last)


def train_students(s: DemoSettings, data, pretrained, teacher, out: Path, log=print):
    """The rows of ``s.rows`` in order.

    ``hts_init="dense"``: a dense student is trained from the backbone first (the *dense start*,
    ``student_epochs``); every row, the dense one included, is then fine-tuned from it for
    ``hts_epochs`` with the same schedule, so all rows have the same training budget and differ
    only in what the row adds. ``"backbone"``: every row from the backbone (``student_epochs``).
    """
    log(f"[4/5] students (hidden {s.student_hidden})")
    start = None
    if s.hts_init == "dense":
        start = train_student(
            "dense", s, data, out, pretrained=pretrained, name="dense_start", log=log
        )
    trained = [
        train_student(
            key,
            s,
            data,
            out,
            start_from=start.model if start is not None else None,
            pretrained=pretrained,
            teacher=teacher,
            log=log,
        )
        for key in s.rows
    ]
    if start is not None:  # each row's time includes the dense start it shares
        for row in trained:
            row.train_seconds += start.train_seconds
    return trained


def time_models(models: dict, s: DemoSettings) -> dict[str, list[float]]:
    """Milliseconds per forward of each model at ``timing_batch``, one value per timed round.

    The rounds interleave the models (``benchmark.time_round_robin``), so a slow spell of the
    machine hits every model alike, and in each round a model runs enough forwards back to back
    to last about ``timing_round_seconds``: one forward of these small models takes a few tens
    of milliseconds, and ten single calls per model moved the speed-up between 1.18x and 1.56x
    from one run to the next on the same checkpoints."""
    from .benchmark import synchronizer
    from .inference import resolve_device

    device = resolve_device("auto")  # the one device policy (inference.resolve_device)
    pixels = torch.randn(s.timing_batch, 3, *s.image_size, device=device)
    sync = synchronizer(device)
    for model in models.values():
        model.to(device).eval()
    with torch.inference_mode():
        calls = {name: (lambda m=model: m(pixels)) for name, model in models.items()}
        counts = {
            name: _calls_lasting(call, s.timing_round_seconds, sync) for name, call in calls.items()
        }
        wall, _ = time_round_robin(
            calls, repeats=s.timing_repeats, warmup=1, sync=sync, calls_per_round=counts
        )
    return wall


def _calls_lasting(call, seconds: float, sync) -> int:
    """How many calls of ``call`` back to back last about ``seconds`` (one timed call; it also
    warms the call up)."""
    sync()
    start = time.perf_counter()
    call()
    sync()
    return max(1, math.ceil(seconds / max(time.perf_counter() - start, 1e-6)))


def speedups(times: dict[str, list[float]], base: str) -> dict[str, tuple[float, float, float]]:
    """Each model's speed-up over ``base``, round by round (the two timed in the same round):
    (median, lowest, highest) over the rounds."""
    out = {}
    for name, ms in times.items():
        ratios = sorted(b / m for b, m in zip(times[base], ms))
        out[name] = (statistics.median(ratios), ratios[0], ratios[-1])
    return out


def measure(trained: list[Trained], data, s: DemoSettings, teacher=None, log=print):
    """Evaluate and time every model; check each HTS student's token selection against the
    teacher (``analysis.check_token_selection``). Returns the table's rows."""
    from .analysis import check_token_selection

    log("[5/5] evaluation (true token dropping), timing, predictor checks")
    timings = time_models({t.key: t.model for t in trained}, s)
    base = next((t.key for t in trained if t.keep_rate == 1.0), trained[0].key)
    speed = speedups(timings, base)
    rows = []
    for t in trained:
        model, cfg = t.model, t.model.config
        hts = isinstance(model, SureidStudentModel) and cfg.hts_enabled
        check = None
        if hts:
            check = check_token_selection(
                model, data["query"], data["gallery"], guide=teacher, seed=s.seed
            ).summary()
            r1, m_ap = check["predictor_R1"], check["predictor_mAP"]
        else:
            r1, m_ap = _evaluate(model, data)
        tokens = (
            cfg.tokens_per_block()[-1] - cfg.num_prefix_tokens
            if isinstance(model, SureidStudentModel)
            else cfg.num_patches
        )
        ms = statistics.median(timings[t.key])
        ips = s.timing_batch / (ms / 1000.0)
        rows.append(
            DemoRow(
                t.label,
                t.keep_rate,
                tokens,
                r1,
                m_ap,
                ips,
                ms,
                t.train_seconds,
                check=check,
                extra={"last_log": t.last_log},
                speedup=speed[t.key][0],
                speedup_range=speed[t.key][1:],
            )
        )
    return rows


def run_demo(settings: DemoSettings | None = None, log=print) -> list[DemoRow]:
    """Run the whole demo; returns the table rows and writes ``report.md`` into ``out_dir``."""
    s = settings or DemoSettings()
    check_settings(s)
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(s, out, log)
    log("[2/5] pretrained backbones (the offline stand-in for ImageNet weights)")
    pretrained, path = load_pretrained(s, "student", log)
    teacher = train_teacher(s, data, load_pretrained(s, "teacher", log)[0], out, log)
    trained = train_students(s, data, pretrained, teacher.model, out, log)
    trained.append(teacher)
    if pretrained is not None:  # what the fine-tuning adds: the backbone alone, fresh BNNeck
        trained.append(
            Trained(
                "backbone", "pretrained backbone, not fine-tuned", backbone_model(path, s), 1.0, 0.0
            )
        )
    rows = measure(trained, data, s, teacher.model, log)
    write_demo_cards(out, s, trained, rows)  # README.md beside each checkpoint, these numbers
    figure = _kept_token_figure(trained, data, out)
    total = time.perf_counter() - t0
    table = format_table(rows)
    log("\n" + table)
    checks = format_check_table(rows)
    if checks:
        log("\n" + checks)
    write_report(out, s, rows, figure, total)
    from .zoo import record_demo_location

    record_demo_location(out)  # so the demo-* zoo ids load from any folder
    log(f"\nreport: {out / 'report.md'}   ({total / 60:.1f} min in all)")
    return rows


def write_demo_cards(out, settings, trained, rows) -> list[Path]:
    """Cards for the demo's checkpoints, with the R1 / mAP and speed-up the demo measured.

    ``trained`` and ``rows`` are ``demo.train_students`` / ``demo.measure``'s lists, in the same
    order; a model without a checkpoint folder in ``out`` (the backbone row) gets no card.
    """
    from .model_card import build_model_card, write_model_card
    from .zoo import DEMO_ZOO_IDS, demo_folder

    out = Path(out)
    base = next((r for r in rows if r.keep_rate == 1.0), None)
    skip = ("out_dir", "rows", "threads", "timing_batch", "timing_repeats", "timing_round_seconds")
    settings_table = {k: v for k, v in asdict(settings).items() if k not in skip}
    written = []
    for t, row in zip(trained, rows):
        folder = out / demo_folder(t.key)
        if not (folder / "config.json").is_file():
            continue
        spec = ROWS.get(t.key)
        speed = {
            "images_per_second": row.images_per_second,
            "speedup": row.speedup,
            "reference": base.name if base else None,
            "setting": f"measured side by side with the demo's other models, batch "
            f"{settings.timing_batch}, {torch.get_num_threads()} CPU threads",
        }
        if spec is None:
            origin = "the demo's teacher backbone" if settings.teacher_backbone else None
        elif settings.hts_init == "dense":
            origin = f"the demo's dense start ({out / 'dense_start'})"
        else:
            origin = "the demo backbone" if settings.backbone else None
        card = build_model_card(
            t.model,
            model_name=DEMO_ZOO_IDS.get(t.key, f"sureid-demo-{t.key}"),
            dataset="synthetic",
            metrics={"R1": row.rank1, "mAP": row.mAP},
            protocol="market",
            started_from=origin or "random weights",
            teacher=f"the demo's teacher ({out / 'teacher'})" if spec and spec.distil else None,
            training={
                "demo row": t.label,
                "NODA": spec.noda if spec else settings.teacher_noda,
                **settings_table,
            },
            command=f"sureid demo --out {out}",
            speed=speed,
            load_id=str(folder),
            limits=[
                "A demo model: a few epochs on a small synthetic set "
                "(docs/training.md#the-demo in the SUREID repository)."
            ],
        )
        written.append(write_model_card(folder, card))
    return written


def _kept_token_figure(trained: list[Trained], data, out: Path) -> Path | None:
    """The SUREID student's kept tokens on occluded queries (the paper's Fig. 6); else the
    last HTS row's; None without one."""
    from .visualize import plot_kept_tokens

    hts = [t for t in trained if t.keep_rate < 1 and isinstance(t.model, SureidStudentModel)]
    if not hts:
        return None
    chosen = next((t for t in hts if t.key == "hts+npkd+noda"), hts[-1])
    query = data["query"]
    if "occluded" in query.column_names:
        query = query.select([i for i, flag in enumerate(query["occluded"]) if flag])
    images = query.select(range(min(8, len(query))))["image"]
    return plot_kept_tokens(chosen.model, images, out / "kept_tokens.png")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def format_table(rows: list[DemoRow]) -> str:
    """The markdown table of the report (R1 / mAP in %, images/s at the timing batch)."""
    base = next((r.images_per_second for r in rows if r.keep_rate == 1.0), None)
    lines = [
        "| model | keep | tokens in last blocks | R1 | mAP | img/s | speed-up (range) | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = r.speedup
        if speedup is None and base:  # rows saved before the round-by-round speed-up
            speedup = r.images_per_second / base
        speed = "-" if speedup is None else f"{speedup:.2f}x"
        if r.speedup_range is not None:
            speed += f" ({r.speedup_range[0]:.2f}-{r.speedup_range[1]:.2f})"
        lines.append(
            f"| {r.name} | {r.keep_rate:g} | {r.tokens_last_stage} | {100 * r.rank1:.1f} | "
            f"{100 * r.mAP:.1f} | {r.images_per_second:.0f} | {speed} | {r.train_seconds:.0f} |"
        )
    return "\n".join(lines)


def _pair(check: dict, name: str) -> str:
    r1, m_ap = check.get(f"{name}_R1"), check.get(f"{name}_mAP")
    return "-" if r1 is None else f"{100 * r1:.1f} / {100 * m_ap:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_check_table(rows: list[DemoRow]) -> str:
    """The predictor check of each HTS row as a markdown table ('' without HTS rows)."""
    checked = [r for r in rows if r.check]
    if not checked:
        return ""
    lines = [
        "| model | R1 / mAP: predictors | random keeping | teacher's rollout (oracle) | "
        "Spearman vs teacher's rollout / attention-norm | kept on visible body: predictors / "
        "teacher's rollout (chance) "
        "| body AUC: predictors / teacher's rollout |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in checked:
        c = r.check
        rho = f"{_signed(c.get('spearman'))} / {_signed(c.get('spearman_attention_norm'))}"
        body = (
            "-"
            if c.get("body_share") is None
            else f"{100 * c['body_share']:.0f}% / {_percent(c.get('guide_body_share'))} "
            f"({100 * c['body_chance']:.0f}%)"
        )
        auc = (
            "-"
            if c.get("body_auc") is None
            else f"{c['body_auc']:.2f} / {_decimal(c.get('guide_body_auc'))}"
        )
        lines.append(
            f"| {r.name} | {_pair(c, 'predictor')} | {_pair(c, 'random')} | "
            f"{_pair(c, 'guide')} | {rho} | {body} | {auc} |"
        )
    return "\n".join(lines)


def format_occluder_table(rows: list[DemoRow]) -> str:
    """What each HTS row keeps of the occluder, as a markdown table ('' without occluder
    measures: no HTS row, or a data set without occluder masks)."""
    checked = [r for r in rows if r.check and r.check.get("occluder_share") is not None]
    if not checked:
        return ""
    lines = [
        "| model | kept on the occluder: predictors (chance) | R1 / mAP: predictors | "
        "stage-1 ranking at every stage | the same, occluder dropped first (oracle) |",
        "|---|---|---|---|---|",
    ]
    for r in checked:
        c = r.check
        lines.append(
            f"| {r.name} | {100 * c['occluder_share']:.0f}% ({100 * c['occluder_chance']:.0f}%) "
            f"| {_pair(c, 'predictor')} | {_pair(c, 'stage1_ranking')} "
            f"| {_pair(c, 'occluder_dropped')} |"
        )
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _decimal(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


_CHECK_TEXT = (
    "Predictor check: what each HTS student's token predictors learned. R1 / mAP with",
    "its predictors (as it runs), with as many tokens kept at random (the mean of 5",
    "draws), and with the top-k of the teacher's attention rollout (an oracle: a full",
    "dense pass of the teacher); the Spearman correlation of the stage-1 keep score with",
    "that rollout and with the teacher's attention-norm (its attention weighted by the",
    "norm of what each token adds; mean over the queries); the share of the last stage's",
    "kept patches that are mostly visible body, against the share of all patches that",
    "are (what random keeping gets); the body AUC: how often a visible-body patch",
    "outranks a patch that is not, by the stage-1 keep score and by the teacher's",
    "rollout (0.5 = no preference).",
)
_OCCLUDER_TEXT = (
    "What the predictors keep of the occluder: the share of the last stage's kept",
    "patches that are mostly occluder, against the share of all patches that are; R1 /",
    "mAP when every stage keeps its top-k by the stage-1 keep score, and by the same",
    "ranking with the occluder's patches put last (an oracle: the occluder masks are",
    "the synthetic set's).",
)


def _report_start(s: DemoSettings) -> str:
    """The report's sentence on where the models start."""
    start = (
        "Every model starts from random weights (no backbone)."
        if s.backbone is None
        else "The dense student, and the teacher when it has its width, start from the demo "
        "backbone: a dense ViT pretrained on other synthetic people, the offline stand-in for "
        "the paper's ImageNet weights."
    )
    if s.hts_init == "dense":
        start += (
            f" A dense student is trained {s.student_epochs:g} epochs from it, and every row is "
            f"then fine-tuned {s.hts_epochs:g} epochs from that dense start (the HTS rows as "
            "DynamicViT fine-tunes a trained DeiT), so all rows have the same budget; train s "
            "includes the shared dense start."
        )
    return start


def write_report(out: Path, s: DemoSettings, rows, figure, total: float) -> None:
    """``report.md`` (tables, figure, settings) and ``results.json`` in ``out``."""
    import timm
    import transformers

    lines = [
        "# SUREID demo report",
        "",
        "The paper's Table IV in miniature on the built-in synthetic occluded set (every query",
        f"occluded). {_report_start(s)}",
        "R1 / mAP under the Market/Duke protocol, students in eval mode (true token",
        "dropping). Speed-up is relative to the first row, measured in the same run,",
        f"batch {s.timing_batch}, {torch.get_num_threads()} CPU threads.",
        "",
        format_table(rows),
        "",
        f"Total time: {total / 60:.1f} min. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}.",
        "",
    ]
    for text, table in (
        (_CHECK_TEXT, format_check_table(rows)),
        (_OCCLUDER_TEXT, format_occluder_table(rows)),
    ):
        if table:
            lines += [*text, "", table, ""]
    if figure is not None:
        lines += [
            "Kept tokens of the SUREID student on occluded queries (white = dropped):",
            "",
            f"![kept tokens]({Path(figure).name})",
            "",
        ]
    lines += ["Settings:", "", "```json", json.dumps(asdict(s), indent=2), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
