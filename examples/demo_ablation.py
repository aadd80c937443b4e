"""Variants of the demo's HTS students, side by side, over several seeds.

Each seed's data, dense start (the dense student every row is fine-tuned from) and teacher are
made once (by the demo's own steps, and reused from ``--out`` when they are there); then every
variant (demo settings overridden) fine-tunes the rows from that dense start, as the demo does,
and each row is evaluated with true token dropping; the HTS rows are also checked (``sureid.check_token_selection`` against the teacher: random keeping, the teacher's
rollout top-k, Spearman, share of kept patches on the visible body). Prints a table per seed
and the mean over seeds. docs/training.md#the-demo quotes its tables, e.g.:

    python examples/demo_ablation.py --out runs/ablation --seeds 0 1 2 \\
        --variant "paper:token_guidance=none,hts_sampling=gumbel" \\
        --variant "default:"

A variant is ``NAME:field=value,...`` over ``sureid.demo.DemoSettings`` fields (values parsed as
Python literals when they parse, else kept as strings). ``--reuse`` checks the rows already
saved under ``--out`` instead of training them again (e.g. after the check has learned a new
measure); rows not there are trained.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from sureid import SureidStudentModel, SureidTeacherModel, check_token_selection, evaluate_model
from sureid.demo import (
    ROWS,
    DemoSettings,
    load_pretrained,
    prepare_data,
    train_student,
    train_teacher,
)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    unknown = set(overrides) - set(DemoSettings.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"variant {name!r}: unknown DemoSettings fields {sorted(unknown)}")
    return name, overrides


def evaluate(model, data) -> tuple[float, float]:
    """R1 and mAP with true token dropping (``sureid.evaluate_model``, as the demo reports)."""
    metrics = evaluate_model(model, data["query"], data["gallery"], progress=False).metrics
    return metrics.rank(1), metrics.mAP


def cached(path: Path, cls, make):
    """The model saved in ``path``, or ``make()`` (which saves it there)."""
    if (path / "config.json").is_file():
        return cls.from_pretrained(path).eval()
    return make().model


def run_seed(
    seed: int, base: dict, variants: list[tuple[str, dict]], rows, out: Path, reuse: bool = False
) -> list:
    s = DemoSettings(out_dir=str(out / f"seed{seed}"), seed=seed, **base)
    work = Path(s.out_dir)
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
        sv = replace(s, **overrides)
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
    parser.add_argument("--variant", action="append", default=[], help="NAME:field=value,...")
    parser.add_argument("--rows", nargs="+", default=["dense", "hts"], choices=list(ROWS))
    parser.add_argument("--base", default="", help="field=value,... applied to every run")
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
    out = Path(args.out)
    per_seed = []
    for seed in args.seeds:
        results = run_seed(seed, base, variants, args.rows, out, args.reuse)
        per_seed.append(results)
        print(f"\nseed {seed}\n" + "\n".join(format_rows(results)), flush=True)
    table = format_rows(mean_rows(per_seed))
    print(f"\nmean over seeds {args.seeds}\n" + "\n".join(table))
    (out / "results.json").write_text(
        json.dumps({"seeds": args.seeds, "variants": args.variant, "runs": per_seed}, default=str)
    )


if __name__ == "__main__":
    main()
