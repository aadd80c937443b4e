"""Variants of the demo's HTS students, side by side, over several seeds.

Each seed's data, dense start (the dense student every row is fine-tuned from) and teacher are
made once (by the demo's own steps, and reused from ``--out`` when they are there); then every
variant (demo settings overridden) fine-tunes the rows from that dense start, as the demo does,
and each row is evaluated with true token dropping; the HTS rows are also checked
(``sureid.analysis.check_token_selection`` against the teacher: random keeping, the teacher's
rollout top-k, Spearman, share of kept patches on the visible body). Prints a table per seed
and the mean over seeds. research/notes quotes its tables. From the repository root, e.g.:

    python -m research.demo_ablation --out runs/ablation --seeds 0 1 2 \\
        --rows hts hts+npkd hts+npkd+noda \\
        --variant "paper:" --variant "topk:hts_sampling=gumbel-topk" \\
        --variant "lr:training.predictor_learning_rate=None"

A variant is ``NAME:field=value,...``: ``field`` is a ``sureid.demo.DemoSettings`` field, or
``training.FIELD`` to override one key of ``DemoSettings.training`` (a
``SureidTrainingArguments`` field: ``training.learning_rate=1e-3``, ``training.lambda_token=1.0``);
values are parsed as Python literals when they parse, else kept as strings; ``NAME:`` alone is
the demo's own settings. ``--base`` takes the same ``field=value,...`` for every run, and
``--quick`` starts from ``sureid.demo.quick_settings`` (tiny sizes, one epoch: a smoke run whose
numbers mean nothing). ``--reuse`` checks the rows already saved under ``--out`` instead of
training them again (e.g. after the check has learned a new measure); rows not there are
trained.

Retired options' experiments: `git checkout 8907d49` and the command as documented then.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import torch

from sureid import SureidStudentModel, SureidTeacherModel, evaluate_model
from sureid.analysis import check_token_selection
from sureid.demo import (
    ROWS,
    DemoSettings,
    load_pretrained,
    prepare_data,
    quick_settings,
    train_student,
    train_teacher,
)
from sureid.trainer import SureidTrainingArguments

TRAINING = "training."
# DemoSettings fields of earlier versions that moved into ``DemoSettings.training``.
MOVED = {
    "learning_rate": "training.learning_rate",
    "weight_decay": "training.weight_decay",
    "optim": "training.optim",
    "predictor_learning_rate": "training.predictor_learning_rate",
    "lambda_token": "training.lambda_token",
    "random_patch": "training.random_patch",
    "random_erasing": "training.random_erasing",
    "instances": "training.num_instances",
    "identities_per_batch": "training.per_device_train_batch_size (identities x instances)",
}
# Options of earlier versions (DemoSettings or training fields) that have left the library.
RETIRED = {
    "hts_topk_epochs",
    "hts_guide",
    "token_guidance",
    "ratio_on",
    "feature_reduction",
    "lambda_occlusion",
    "freeze_backbone_steps",
}


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:field=value,...`` as (NAME, {field: value}); ``training.FIELD`` keys name a key
    of ``DemoSettings.training``. Exits naming any field that is neither."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    settings = {f.name for f in fields(DemoSettings)}
    training = {f.name for f in fields(SureidTrainingArguments)}
    problems = []
    for key in overrides:
        field = key[len(TRAINING) :] if key.startswith(TRAINING) else key
        if field in RETIRED:
            problems.append(f"{key!r}: a retired option (its experiments: `git checkout 8907d49`)")
        elif key.startswith(TRAINING) and field not in training:
            problems.append(f"{key!r}: not a SureidTrainingArguments field")
        elif key in MOVED:
            problems.append(f"{key!r}: now {MOVED[key]}")
        elif not key.startswith(TRAINING) and key not in settings:
            problems.append(f"{key!r}: not a DemoSettings field")
    if problems:
        raise SystemExit(
            f"variant {name!r}: " + "; ".join(problems) + " (a field is a DemoSettings field or "
            "training.FIELD, FIELD a SureidTrainingArguments field)"
        )
    return name, overrides


def apply_overrides(s: DemoSettings, overrides: dict) -> DemoSettings:
    """``s`` with a variant's overrides (``parse_variant``): DemoSettings fields replaced,
    ``training.FIELD`` keys set in a copy of ``s.training``."""
    training = {k[len(TRAINING) :]: v for k, v in overrides.items() if k.startswith(TRAINING)}
    plain = {k: v for k, v in overrides.items() if not k.startswith(TRAINING)}
    if training:
        plain["training"] = {**plain.get("training", s.training), **training}
    return replace(s, **plain)


def evaluate(model, data) -> tuple[float, float]:
    """R1 and mAP with true token dropping (``sureid.evaluate_model``, as the demo reports)."""
    metrics = evaluate_model(model, data["query"], data["gallery"], progress=False).metrics
    return metrics.rank(1), metrics.mAP


def cached(path: Path, cls, make):
    """The model saved in ``path``, or ``make()`` (which saves it there)."""
    if (path / "config.json").is_file():
        return cls.from_pretrained(path).eval()
    return make().model


def run_seed(s: DemoSettings, variants: list[tuple[str, dict]], rows, reuse: bool = False) -> list:
    """One seed (``s.seed``, into ``s.out_dir``): every variant's rows, as (variant, row label,
    R1, mAP, the check's summary or None)."""
    seed, work = s.seed, Path(s.out_dir)
    data = prepare_data(s, work)
    pretrained, _ = load_pretrained(s, "student")
    start = cached(
        work / "dense_start",
        SureidStudentModel,
        lambda: train_student("dense", s, data, work, pretrained=pretrained, name="dense_start"),
    )
    teacher = cached(
        work / "teacher",
        SureidTeacherModel,
        lambda: train_teacher(s, data, load_pretrained(s, "teacher")[0], work),
    )
    results = [("teacher", "-", *evaluate(teacher, data), None)]
    results.append(("dense start", "-", *evaluate(start, data), None))
    for name, overrides in variants:
        sv = apply_overrides(s, overrides)
        for key in rows:
            train = partial(
                train_student, key, sv, data, work / name, start_from=start, teacher=teacher
            )
            saved = work / name / key.replace("+", "_")
            model = cached(saved, SureidStudentModel, train) if reuse else train().model
            if not ROWS[key].hts:
                results.append((name, ROWS[key].label, *evaluate(model, data), None))
                continue
            check = check_token_selection(
                model, data["query"], data["gallery"], guide=teacher, seed=seed
            ).summary()
            results.append(
                (name, ROWS[key].label, check["predictor_R1"], check["predictor_mAP"], check)
            )
    return results


def format_rows(results) -> list[str]:
    lines = [
        "| variant | row | R1 | mAP | random R1 | rollout top-k R1 | Spearman: rollout / "
        "attention-norm | on body (chance) | body AUC: predictors / rollout | on occluder "
        "(chance) | R1: stage-1 ranking / occluder dropped | training sampling keeps of the "
        "top-k (chance) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row, r1, m_ap, c in results:
        if c is None:
            lines.append(f"| {name} | {row} | {100 * r1:.1f} | {100 * m_ap:.1f} | | | | | | | | |")
            continue
        occluder = ranking = overlap = "-"
        if c.get("occluder_share") is not None:
            occluder = f"{100 * c['occluder_share']:.0f}% ({100 * c['occluder_chance']:.0f}%)"
            ranking = f"{100 * c['stage1_ranking_R1']:.1f} / {100 * c['occluder_dropped_R1']:.1f}"
        if c.get("sampling_overlap") is not None:
            overlap = (
                f"{100 * c['sampling_overlap']:.0f}% ({100 * c['sampling_overlap_chance']:.0f}%)"
            )
        lines.append(
            f"| {name} | {row} | {100 * r1:.1f} | {100 * m_ap:.1f} | {100 * c['random_R1']:.1f} "
            f"| {100 * c['guide_R1']:.1f} | {c['spearman']:+.2f} / "
            f"{c['spearman_attention_norm']:+.2f} | "
            f"{100 * c['body_share']:.0f}% ({100 * c['body_chance']:.0f}%) | "
            f"{c['body_auc']:.2f} / {c['guide_body_auc']:.2f} | {occluder} | {ranking} "
            f"| {overlap} |"
        )
    return lines


def mean_rows(per_seed: list[list]) -> list:
    """Average every number of the same (variant, row) over the seeds."""
    out = []
    for position, first in enumerate(per_seed[0]):
        runs = [results[position] for results in per_seed]
        r1 = sum(r[2] for r in runs) / len(runs)
        m_ap = sum(r[3] for r in runs) / len(runs)
        check = None
        if first[4] is not None:
            check = {
                k: None
                if any(r[4][k] is None for r in runs)
                else sum(r[4][k] for r in runs) / len(runs)
                for k in first[4]
            }
        out.append((first[0], first[1], r1, m_ap, check))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME:field=value,... (see above)"
    )
    parser.add_argument("--rows", nargs="+", default=["dense", "hts"], choices=list(ROWS))
    parser.add_argument("--base", default="", help="field=value,... applied to every run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one epoch: a smoke run")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="check the rows saved under --out, do not retrain"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    base = parse_variant("base:" + args.base)[1]
    if {"seed", "out_dir"} & set(base):
        raise SystemExit("--base cannot set seed or out_dir: use --seeds and --out")
    out = Path(args.out)
    make = quick_settings if args.quick else DemoSettings
    per_seed = []
    for seed in args.seeds:
        s = apply_overrides(make(out_dir=str(out / f"seed{seed}"), seed=seed), base)
        results = run_seed(s, variants, args.rows, args.reuse)
        per_seed.append(results)
        print(f"\nseed {seed}\n" + "\n".join(format_rows(results)), flush=True)
    table = format_rows(mean_rows(per_seed))
    print(f"\nmean over seeds {args.seeds}\n" + "\n".join(table))
    (out / "results.json").write_text(
        json.dumps({"seeds": args.seeds, "variants": args.variant, "runs": per_seed}, default=str)
    )


if __name__ == "__main__":
    main()
