"""Where does a demo model's attention go after fine-tuning, recipe by recipe?

``research.attention_probe`` finds the demo's teacher's attention rollout off the person (body
AUC about 0.6), so the predictor check's Spearman with it is negative. This probe asks which part
of the training puts it there. It fine-tunes the demo's dense student (``--role student``, from
its backbone, ``student_epochs``) or its teacher (``--role teacher``, from the teacher backbone,
``teacher_epochs``, with NODA when ``teacher_noda``) once per variant of the demo settings, on a
demo folder's training set, and measures each model, and the backbone it starts from, on the
folder's occluded queries:

- R1 / mAP (dense);
- body AUC of the rollout, the class token's attention and attention-norm (0.5 = no preference
  for the visible body), and the rollout top-k's share on the body against chance;
- the background / body norm of the image tokens after the first block;
- the Spearman of each HTS student's stage-1 keep score (``--students``: a folder with the
  demo's ``hts`` / ``hts_npkd`` / ``hts_npkd_noda``) with the model's rollout: the predictor
  check's Spearman, had this model been the teacher.

A variant is ``NAME:field=value,...`` as in ``research.demo_ablation``: a
``sureid.demo.DemoSettings`` field, or ``training.FIELD`` for one key of
``DemoSettings.training``. Models are saved under ``--work-dir/seedN/ROLE/NAME`` with the data
folder and settings they were trained with, and reused when both match. ``--quick`` starts
from ``sureid.demo.quick_settings`` (tiny sizes, one epoch: a smoke run whose numbers mean
nothing). research/notes/attention-probes.md quotes its tables. From the repository root, e.g.:

    python -m research.demo_ablation --out runs/ablation --seeds 0 --rows hts hts+npkd \\
        hts+npkd+noda --variant "paper:"
    python -m research.finetune_attention_probe runs/ablation/seed0 \\
        --students runs/ablation/seed0/paper --role student --variant "paper:" \\
        --variant "no-patch:training.random_patch=0.0" \\
        --variant "no-erasing:training.random_erasing=0.0"

Retired options' experiments: `git checkout 8907d49` and the command as documented then.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research.attention_probe import demo_queries, importance_maps, probe_students
from research.demo_ablation import apply_overrides, evaluate, parse_variant
from research.register_probe import measure
from sureid import SureidModel
from sureid.analysis import IMPORTANCE_METHODS
from sureid.data import load_reid_dataset
from sureid.demo import (
    DemoSettings,
    backbone_model,
    load_pretrained,
    quick_settings,
    train_student,
    train_teacher,
)

STUDENTS = ("hts", "hts_npkd", "hts_npkd_noda")


def fine_tune(s: DemoSettings, role: str, data, work: Path, recipe: dict):
    """The demo's dense student or teacher trained with ``s`` into ``work``; reused when
    ``work`` holds one trained with the same ``recipe`` (data folder and overrides)."""
    saved = work / ("teacher" if role == "teacher" else "dense")
    stamp = work / "probe_recipe.json"
    if (saved / "config.json").is_file():
        if not stamp.is_file() or json.loads(stamp.read_text()) != recipe:
            raise SystemExit(
                f"{saved} was trained with another recipe than {recipe} (see {stamp.name}): "
                "name the variant differently, pass another --work-dir, or delete that folder"
            )
        return SureidModel.from_pretrained(saved).eval()
    if role == "teacher":
        pretrained, _ = load_pretrained(s, "teacher", log=lambda _: None)
        model = train_teacher(s, data, pretrained, work, log=lambda _: None).model
    else:
        pretrained, _ = load_pretrained(s, "student", log=lambda _: None)
        model = train_student("dense", s, data, work, pretrained=pretrained, log=lambda _: None)
        model = model.model
    stamp.write_text(json.dumps(recipe))
    return model


def row(name: str, model, data, query, students: Path | None, names, keep: int) -> str:
    maps_and_norms = importance_maps(model, query)
    m = measure(model, query, keep, maps_and_norms)
    auc, top = m["auc"], m["top"]
    scores = "-"
    if model.config.num_identities:  # the backbone alone has no head: no R1 to speak of
        r1, m_ap = evaluate(model, data)
        scores = f"{100 * r1:.1f} / {100 * m_ap:.1f}"
    rhos = "-"
    if names:
        found = probe_students(students, names, model.config, maps_and_norms[0], query)
        rollout = list(IMPORTANCE_METHODS).index("rollout")
        rhos = " / ".join(f"{rho[rollout]:+.2f}" for _, rho, _ in found)
    return (
        f"| {name} | {scores} | {auc['rollout']:.2f} / {auc['cls-attention']:.2f} / "
        f"{auc['attention-norm']:.2f} | {100 * top['rollout']:.0f}% ({100 * m['chance']:.0f}%) | "
        f"{m['norm_ratio']:.2f} | {rhos} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a demo folder (its data/ and queries)")
    parser.add_argument("--role", choices=["student", "teacher"], default="student")
    parser.add_argument("--variant", action="append", default=[], help="NAME:field=value,...")
    parser.add_argument("--students", type=Path, default=None, help="folder with HTS students")
    parser.add_argument("--seed", type=int, default=0, help="the folder's demo seed")
    parser.add_argument("--keep", type=int, default=44, help="top-k for the body share")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/finetune_attention_probe"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one epoch: a smoke run")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    query = demo_queries(args.folder, args.threads)
    data = load_reid_dataset("synthetic", args.folder / "data")
    settings = (quick_settings if args.quick else DemoSettings)(seed=args.seed)
    variants = [parse_variant(text) for text in args.variant or ["paper:"]]
    other = "student_" if args.role == "teacher" else "teacher_"
    for name, overrides in variants:
        unused = sorted(k for k in overrides if k.startswith(other))
        if unused:
            raise SystemExit(f"variant {name!r}: {unused} do not change the {args.role}'s training")
    names = [n for n in STUDENTS if args.students and (args.students / n / "config.json").is_file()]
    if args.students and not names:
        raise SystemExit(f"--students {args.students} holds none of {', '.join(STUDENTS)}")
    print(
        f"\n{args.role}, fine-tuned on {args.folder / 'data'}\n\n| model | R1 / mAP "
        "| body AUC: rollout / cls-attention / attention-norm | rollout top-"
        f"{args.keep} on body (chance) | background / body norm after block 1 "
        f"| Spearman of the HTS students' keep score with its rollout "
        f"({', '.join(names) or 'no --students given'}) |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    _, path = load_pretrained(settings, args.role, log=lambda _: None)
    if path is not None:  # no backbone: random weights, nothing to measure
        backbone = backbone_model(path, settings, role=args.role)
        print(row("backbone", backbone, data, query, args.students, names, args.keep), flush=True)
    for name, overrides in variants:
        work = args.work_dir / f"seed{args.seed}" / args.role / name
        recipe = {"data": str(args.folder.resolve() / "data"), "overrides": overrides}
        if args.quick:
            recipe["quick"] = True
        model = fine_tune(apply_overrides(settings, overrides), args.role, data, work, recipe)
        print(row(name, model, data, query, args.students, names, args.keep), flush=True)


if __name__ == "__main__":
    main()
