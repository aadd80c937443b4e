"""The main job (`sureid demo`, `make demo`): the paper's Table IV in miniature, on CPU.

Generates the built-in synthetic occluded set; loads the demo backbone (a small dense ViT
pretrained on a second synthetic set of *other* people: the offline stand-in for the ImageNet
weights the paper starts from, made by ``pretrain_backbone`` /
``examples/make_demo_backbone.py`` and shipped in ``sureid/assets``); trains a teacher from it;
then four students from the same weights: dense (keep 1.0), +HTS, +HTS+NPKD, +HTS+NPKD+NODA;
evaluates each (R1 / mAP, true token dropping at test time) and measures its images/s side by
side; writes a markdown report, the kept-token figure and the checkpoints into an output folder.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .benchmark import time_forward
from .configuration_sureid import SureidStudentConfig, SureidTeacherConfig
from .modeling_sureid import SureidStudentModel, SureidTeacherModel


@dataclass
class DemoSettings:
    """Sizes aimed at about ten minutes on 2 idle CPU cores (docs/training.md#the-demo).

    128x64 images with patch 8 give 128 image tokens, as DeiT-S has at 256x128 with patch 16,
    so HTS drops as many tokens per stage as in the paper. ``backbone``: the pretrained encoder
    every student (and a teacher of the students' width) starts from: ``"builtin"`` (the file in
    ``sureid/assets``), a path made by ``pretrain_backbone``, or None (random weights).
    """

    out_dir: str = "sureid-demo"
    seed: int = 0
    train_ids: int = 64
    test_ids: int = 64
    backbone: str | None = "builtin"
    image_size: tuple[int, int] = (128, 64)
    patch_size: int = 8  # 16 x 8 = 128 image tokens
    student_hidden: int = 96
    student_heads: int = 3
    teacher_hidden: int = 96
    teacher_heads: int = 3
    depth: int = 6
    sparsify_layers: tuple[int, ...] = (1, 3, 5)
    keep_rate: float = 0.7
    teacher_epochs: float = 10
    student_epochs: float = 6
    identities_per_batch: int = 8
    instances: int = 4
    # The paper's SGD recipe assumes a long schedule; in the demo's 96 steps these small ViTs
    # move far faster with AdamW.
    optim: str = "adamw_torch"
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    timing_batch: int = 32
    timing_repeats: int = 10
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
        teacher_epochs=1,
        student_epochs=1,
        identities_per_batch=4,
        instances=2,
        timing_batch=4,
        timing_repeats=1,
    )
    return DemoSettings(**{**fields, **overrides})


# name -> (keep rate from settings?, distil from the teacher?, NODA?)
_ROWS = {
    "dense": ("DeiT-S-like student, dense", False, False, False),
    "hts": ("+ HTS", True, False, False),
    "hts+npkd": ("+ HTS + NPKD", True, True, False),
    "hts+npkd+noda": ("+ HTS + NPKD + NODA (SUREID)", True, True, True),
}


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
    extra: dict = field(default_factory=dict)


def _encoder_kwargs(s: DemoSettings) -> dict:
    return dict(
        image_size=s.image_size,
        patch_size=s.patch_size,
        stride_size=s.patch_size,
        num_hidden_layers=s.depth,
        drop_path_rate=0.05,
    )


def _train(model, data, s: DemoSettings, out: Path, epochs: float, teacher=None, noda=False):
    from .trainer import SureidTrainer, SureidTrainingArguments

    args = SureidTrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=s.identities_per_batch * s.instances,
        num_instances=s.instances,
        optim=s.optim,
        optim_args=None,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        warmup_steps=0.1,
        noda=noda,
        save_strategy="no",
        logging_strategy="epoch",
        use_cpu=not torch.cuda.is_available(),
        seed=s.seed,
        report_to="none",
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
_BACKBONE_FIELDS = ("image_size", "patch_size", "hidden_size", "num_attention_heads", "depth")


def _backbone_shape(s: DemoSettings) -> dict:
    """What a backbone file must match: the students' encoder shape."""
    return dict(
        image_size=list(s.image_size),
        patch_size=s.patch_size,
        hidden_size=s.student_hidden,
        num_attention_heads=s.student_heads,
        depth=s.depth,
    )


def pretrain_backbone(
    out_file: str | Path,
    settings: DemoSettings | None = None,
    *,
    steps: int = 4000,
    num_ids: int = 256,
    seed: int = 1,
    learning_rate: float = 1e-3,
    work_dir: str | Path | None = None,
    log=print,
) -> Path:
    """Train the dense ViT the demo's models start from and save its encoder to ``out_file``.

    The offline stand-in for ImageNet weights: a dense model of the students' shape (width,
    heads, depth, image size, patch) trained with CE + triplet, no NODA, on a synthetic set of
    ``num_ids`` *other* people (``seed`` differs from the demo's, so no demo identity, test or
    train, is in it). Saved as float16 safetensors with the shape and recipe in its metadata.
    """
    from safetensors.torch import save_file

    from .data.datasets import load_reid_dataset
    from .data.synthetic import make_synthetic_reid
    from .trainer import SureidTrainer, SureidTrainingArguments

    s = settings or DemoSettings()
    if seed == s.seed:
        raise ValueError(
            f"the backbone's seed ({seed}) must differ from the demo's ({s.seed}): it has to be "
            "trained on other people than the demo's train and test identities"
        )
    out_file = Path(out_file)
    work = Path(work_dir) if work_dir else out_file.parent / (out_file.stem + "_work")
    root = make_synthetic_reid(
        work / "data", num_train_ids=num_ids, num_test_ids=2, seed=seed, size=s.image_size
    )
    data = load_reid_dataset("synthetic", root)
    torch.manual_seed(seed)
    model = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s),
            hidden_size=s.student_hidden,
            num_attention_heads=s.student_heads,
            num_identities=len(set(data["train"]["pid"])),
        )
    )
    args = SureidTrainingArguments(
        output_dir=str(work / "run"),
        max_steps=steps,
        per_device_train_batch_size=s.identities_per_batch * s.instances,
        num_instances=s.instances,
        optim="adamw_torch",
        optim_args=None,
        learning_rate=learning_rate,
        weight_decay=0.05,
        warmup_steps=0.05,
        noda=False,
        save_strategy="no",
        logging_steps=max(1, steps // 20),
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        report_to="none",
        log_level="warning",
    )
    log(f"pretraining the demo backbone: {steps} steps on {num_ids} synthetic people (seed {seed})")
    start = time.perf_counter()
    SureidTrainer(model=model, args=args, train_dataset=data["train"]).train()
    seconds = time.perf_counter() - start
    shape = _backbone_shape(s)
    recipe = dict(steps=steps, num_ids=num_ids, seed=seed, learning_rate=learning_rate)
    meta = {"shape": json.dumps(shape), "recipe": json.dumps(recipe), "seconds": f"{seconds:.0f}"}
    tensors = {
        k: v.detach().to(torch.float16).contiguous() for k, v in model.encoder.state_dict().items()
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=meta)
    log(f"saved {out_file} ({seconds / 60:.1f} min)")
    return out_file


def load_backbone(path: str | Path, s: DemoSettings) -> dict:
    """Read a backbone file and check it fits ``s`` (the students' shape); returns its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo backbone {path} not found; make one with examples/make_demo_backbone.py "
            "or run the demo with backbone=None (random weights)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"demo backbone {path} is not a readable safetensors file ({err}); remake it with "
            "examples/make_demo_backbone.py"
        ) from err
    shape = json.loads(meta.get("shape", "{}"))
    want = _backbone_shape(s)
    if shape != want:
        diff = {k: (shape.get(k), want[k]) for k in _BACKBONE_FIELDS if shape.get(k) != want[k]}
        raise ValueError(
            f"demo backbone {path} was made for another shape ({diff}, as (file, settings)); "
            "make one for these settings with pretrain_backbone, or set backbone=None"
        )
    recipe = json.loads(meta.get("recipe", "{}"))
    description = (
        f"pretrained {recipe.get('steps', '?')} steps on {recipe.get('num_ids', '?')} other "
        f"synthetic people, seed {recipe.get('seed', '?')}"
    )
    return {"tensors": tensors, "description": description}


def backbone_model(
    path: str | Path = BUILTIN_BACKBONE, settings: DemoSettings | None = None
) -> SureidTeacherModel:
    """The backbone alone as a dense model (fresh, identity-like BNNeck), in eval mode."""
    s = settings or DemoSettings()
    model = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s), hidden_size=s.student_hidden, num_attention_heads=s.student_heads
        )
    )
    _init_from(model, load_backbone(path, s))
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


def _predictor_check(model, data, seed: int) -> dict:
    """Has the HTS predictor learned to choose? Returns the spread (std over an image's tokens,
    averaged over the queries) of its keep probabilities at each stage, and R1 / mAP when the
    same number of tokens is kept at random (``hts_decisions="random"``) instead."""
    from .evaluation import evaluate_splits
    from .image_processing_sureid import SureidImageProcessor

    processor = SureidImageProcessor.from_model_config(model.config)
    torch.manual_seed(seed)
    feats, spread = {}, None
    for split in ("query", "gallery"):
        rows = []
        for start in range(0, len(data[split]), 64):
            images = data[split].select(range(start, min(start + 64, len(data[split]))))["image"]
            pixels = processor(list(images))["pixel_values"]
            with torch.no_grad():
                rows.append(model(pixels, hts_decisions="random").embeddings)
                if split == "query" and spread is None:
                    probs = model(pixels, hts_decisions="topk").keep_probs
                    spread = [float(p.std(dim=1).mean()) for p in probs]
        feats[split] = torch.nn.functional.normalize(torch.cat(rows), dim=-1)
    result = evaluate_splits(feats["query"], feats["gallery"], data["query"], data["gallery"])
    return {"keep_prob_spread": spread, "random_rank1": result.rank(1), "random_mAP": result.mAP}


def _time(models: dict, s: DemoSettings) -> dict:
    """Images/s of each model at ``timing_batch``, rounds interleaved so noise hits all alike."""
    pixels = torch.randn(s.timing_batch, 3, *s.image_size)
    best = {name: [] for name in models}
    for _ in range(s.timing_repeats):
        for name, model in models.items():
            best[name].append(time_forward(model, pixels, repeats=1, warmup=1).median_ms)
    out = {}
    for name, times in best.items():
        times.sort()
        median = times[len(times) // 2]
        out[name] = (s.timing_batch / (median / 1000.0), median)
    return out


def run_demo(settings: DemoSettings | None = None, log=print) -> list[DemoRow]:
    """Run the whole demo; returns the table rows and writes ``report.md`` into ``out_dir``."""
    from .data.datasets import load_reid_dataset, summary
    from .data.synthetic import make_synthetic_reid

    s = settings or DemoSettings()
    unknown = [r for r in s.rows if r not in _ROWS]
    if unknown:
        raise ValueError(f"unknown demo rows {unknown}; choose from {list(_ROWS)}")
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

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
    num_ids = len(set(data["train"]["pid"]))

    pretrained = None
    if s.backbone is not None:
        path = BUILTIN_BACKBONE if s.backbone == "builtin" else Path(s.backbone)
        pretrained = load_backbone(path, s)
        log(f"[2/5] backbone: {path} ({pretrained['description']})")
    else:
        log("[2/5] no backbone (backbone=None): every model starts from random weights")

    log(f"[3/5] teacher (hidden {s.teacher_hidden}, {s.teacher_epochs:g} epochs, NODA)")
    torch.manual_seed(s.seed)
    teacher = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s),
            hidden_size=s.teacher_hidden,
            num_attention_heads=s.teacher_heads,
            num_identities=num_ids,
        )
    )
    if not _init_from(teacher, pretrained) and pretrained is not None:
        log("  (its width differs from the pretrained model's: it starts from random weights)")
    teacher_seconds, _ = _train(teacher, data, s, out / "teacher", s.teacher_epochs, noda=True)
    teacher.eval()

    log(f"[4/5] students (hidden {s.student_hidden}, {s.student_epochs:g} epochs each)")
    rows: list[DemoRow] = []
    models: dict[str, torch.nn.Module] = {}
    metrics: dict[str, tuple] = {}
    for key in s.rows:
        label, hts, distil, noda = _ROWS[key]
        keep = s.keep_rate if hts else 1.0
        torch.manual_seed(s.seed + 1)  # every student starts from the same weights
        student = SureidStudentModel(
            SureidStudentConfig(
                **_encoder_kwargs(s),
                hidden_size=s.student_hidden,
                num_attention_heads=s.student_heads,
                sparsify_layers=s.sparsify_layers,
                keep_rate=keep,
                num_identities=num_ids,
            )
        )
        _init_from(student, pretrained)
        log(f"  - {label}")
        seconds, last = _train(
            student,
            data,
            s,
            out / key.replace("+", "_"),
            s.student_epochs,
            teacher=teacher if distil else None,
            noda=noda,
        )
        student.eval()
        models[key] = student
        metrics[key] = (label, keep, seconds, last)
    models["teacher"] = teacher
    metrics["teacher"] = (f"teacher (hidden {s.teacher_hidden})", 1.0, teacher_seconds, {})
    if pretrained is not None:
        # What the fine-tuning adds: the backbone alone, with a fresh (identity) BNNeck.
        models["backbone"] = backbone_model(path, s)
        metrics["backbone"] = ("pretrained backbone, not fine-tuned", 1.0, 0.0, {})

    log("[5/5] evaluation (true token dropping) and timing")
    timings = _time(models, s)
    for key, model in models.items():
        r1, m_ap = _evaluate(model, data)
        ips, ms = timings[key]
        label, keep, seconds, last = metrics[key]
        cfg = model.config
        last_tokens = (
            cfg.tokens_per_block()[-1] - cfg.num_prefix_tokens
            if isinstance(model, SureidStudentModel)
            else cfg.num_patches
        )
        extra = {"last_log": last}
        if isinstance(model, SureidStudentModel) and model.config.hts_enabled:
            extra["predictor_check"] = _predictor_check(model, data, s.seed)
        rows.append(DemoRow(label, keep, last_tokens, r1, m_ap, ips, ms, seconds, extra=extra))

    figure = None
    if "hts+npkd+noda" in models or any(r.keep_rate < 1 for r in rows):
        from .visualize import plot_kept_tokens

        key = (
            "hts+npkd+noda" if "hts+npkd+noda" in models else next(k for k in s.rows if _ROWS[k][1])
        )
        images = data["query"].select(range(min(8, len(data["query"]))))["image"]
        figure = plot_kept_tokens(models[key], images, out / "kept_tokens.png")
    total = time.perf_counter() - t0
    table = format_table(rows)
    log("\n" + table)
    _write_report(out, s, rows, table, figure, total)
    log(f"\nreport: {out / 'report.md'}   ({total / 60:.1f} min in all)")
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The markdown table of the report (R1 / mAP in %, images/s at the timing batch)."""
    base = next((r.images_per_second for r in rows if r.keep_rate == 1.0), None)
    lines = [
        "| model | keep | tokens in last blocks | R1 | mAP | img/s | speed-up | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r.images_per_second / base:.2f}x" if base else "-"
        lines.append(
            f"| {r.name} | {r.keep_rate:g} | {r.tokens_last_stage} | {100 * r.rank1:.1f} | "
            f"{100 * r.mAP:.1f} | {r.images_per_second:.0f} | {speed} | {r.train_seconds:.0f} |"
        )
    return "\n".join(lines)


def _write_report(out: Path, s: DemoSettings, rows, table: str, figure, total: float) -> None:
    import timm
    import transformers

    lines = [
        "# SUREID demo report",
        "",
        "The paper's Table IV in miniature on the built-in synthetic occluded set (every query",
        "occluded). "
        + (
            "Every student starts from the same random weights (no backbone)."
            if s.backbone is None
            else "Every student, and the teacher when it has their width, starts from the demo "
            "backbone: a dense ViT pretrained on other synthetic people, the offline stand-in "
            "for the paper's ImageNet weights."
        ),
        "R1 / mAP under the Market/Duke protocol, students in eval mode (true token",
        "dropping). Speed-up is relative to the first row, measured in the same run,",
        f"batch {s.timing_batch}, {torch.get_num_threads()} CPU threads.",
        "",
        table,
        "",
        f"Total time: {total / 60:.1f} min. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}.",
        "",
    ]
    checks = [r for r in rows if "predictor_check" in r.extra]
    if checks:
        lines += [
            "Predictor check: has each HTS student's predictor learned to choose tokens? The",
            "spread of its keep probabilities within an image (std over tokens, per stage), and",
            "R1 / mAP when as many tokens are kept at random instead of by the predictor.",
            "",
            "| model | keep-probability spread per stage | R1 / mAP, predictor | "
            "R1 / mAP, random keep |",
            "|---|---|---|---|",
        ]
        for r in checks:
            c = r.extra["predictor_check"]
            spread = ", ".join(f"{v:.3f}" for v in c["keep_prob_spread"])
            lines.append(
                f"| {r.name} | {spread} | {100 * r.rank1:.1f} / {100 * r.mAP:.1f} | "
                f"{100 * c['random_rank1']:.1f} / {100 * c['random_mAP']:.1f} |"
            )
        lines.append("")
    if figure is not None:
        lines += [
            "Kept tokens of the SUREID student (white = dropped):",
            "",
            f"![kept tokens]({Path(figure).name})",
            "",
        ]
    lines += ["Settings:", "", "```json", json.dumps(asdict(s), indent=2), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
