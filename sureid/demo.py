"""The main job (`sureid demo`, `make demo`): the paper's Table IV in miniature, on CPU.

Generates the built-in synthetic occluded set, trains a small teacher, then four small students
from the same initialisation: dense (keep 1.0), +HTS, +HTS+NPKD, +HTS+NPKD+NODA; evaluates each
(R1 / mAP, true token dropping at test time) and measures its images/s side by side; writes a
markdown report, the kept-token figure and the checkpoints into an output folder.
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
    """Sizes aimed at about ten minutes on 2 idle CPU cores (the first full run, on a shared
    machine, took 20; see docs/training.md#the-demo)."""

    out_dir: str = "sureid-demo"
    seed: int = 0
    train_ids: int = 48
    test_ids: int = 48
    image_size: tuple[int, int] = (128, 64)
    patch_size: int = 16  # 8 x 4 = 32 image tokens
    student_hidden: int = 96
    student_heads: int = 2
    teacher_hidden: int = 192
    teacher_heads: int = 3
    depth: int = 6
    sparsify_layers: tuple[int, ...] = (1, 3, 5)
    keep_rate: float = 0.7
    teacher_epochs: int = 8
    student_epochs: int = 8
    identities_per_batch: int = 8
    instances: int = 4
    # From scratch (the demo is offline: no ImageNet weights) a tiny ViT learns far faster with
    # AdamW than with the paper's SGD, which assumes ImageNet initialisation.
    optim: str = "adamw_torch"
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    timing_batch: int = 32
    timing_repeats: int = 5
    threads: int = 0
    rows: tuple[str, ...] = ("dense", "hts", "hts+npkd", "hts+npkd+noda")


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


def _train(model, data, s: DemoSettings, out: Path, epochs: int, teacher=None, noda=False):
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


def _evaluate(model, data) -> tuple[float, float]:
    from .evaluation import evaluate_reid
    from .inference import extract_features

    q = extract_features(model, data["query"], batch_size=64, progress=False)
    g = extract_features(model, data["gallery"], batch_size=64, progress=False)
    result = evaluate_reid(
        q,
        g,
        data["query"]["pid"],
        data["gallery"]["pid"],
        data["query"]["camid"],
        data["gallery"]["camid"],
        protocol="market",
    )
    return result.rank(1), result.mAP


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

    log(f"[1/4] synthetic occluded set -> {out / 'data'}")
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

    log(f"[2/4] teacher (hidden {s.teacher_hidden}, {s.teacher_epochs} epochs, NODA)")
    torch.manual_seed(s.seed)
    teacher = SureidTeacherModel(
        SureidTeacherConfig(
            **_encoder_kwargs(s),
            hidden_size=s.teacher_hidden,
            num_attention_heads=s.teacher_heads,
            num_identities=num_ids,
        )
    )
    teacher_seconds, _ = _train(teacher, data, s, out / "teacher", s.teacher_epochs, noda=True)
    teacher.eval()

    log(f"[3/4] students (hidden {s.student_hidden}, {s.student_epochs} epochs each)")
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

    log("[4/4] evaluation (true token dropping) and timing")
    timings = _time(models, s)
    for key, model in models.items():
        r1, m_ap = _evaluate(model, data)
        ips, ms = timings[key]
        if key == "teacher":
            label, keep, seconds, last = (
                f"teacher (hidden {s.teacher_hidden})",
                1.0,
                teacher_seconds,
                {},
            )
        else:
            label, keep, seconds, last = metrics[key]
        cfg = model.config
        last_tokens = (
            cfg.tokens_per_block()[-1] - cfg.num_prefix_tokens
            if key != "teacher"
            else cfg.num_patches
        )
        rows.append(
            DemoRow(label, keep, last_tokens, r1, m_ap, ips, ms, seconds, extra={"last_log": last})
        )

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
        "occluded). Students start from the same random weights (no ImageNet pretraining: the demo",
        "runs offline); R1 / mAP under the Market/Duke protocol, students in eval mode (true token",
        "dropping). Speed-up is relative to the first row, measured in the same run,",
        f"batch {s.timing_batch}, {torch.get_num_threads()} CPU threads.",
        "",
        table,
        "",
        f"Total time: {total / 60:.1f} min. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}.",
        "",
    ]
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
