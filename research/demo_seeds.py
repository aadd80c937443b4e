"""The demo over several seeds: run `sureid demo --seed N` for each seed (or read runs already
made) and print each run's table and the mean over the runs.

research/notes/demo-seeds.md quotes its output. From the repository root:

    python -m research.demo_seeds --seeds 0 1 2 --out runs/demo-seeds

(one demo per seed, 8 to 9 minutes each on 2 idle CPU cores; a seed whose folder already
holds ``results.json`` is read, not run again). With ``--read DIR ...`` it only reads those
folders (each made by ``sureid demo --out DIR``). ``--quick`` runs ``sureid demo --quick``
instead (tiny sizes, one epoch: a smoke run whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sureid.demo import (
    DemoRow,
    DemoSettings,
    format_check_table,
    format_table,
    quick_settings,
    run_demo,
)


def load_rows(folder: Path) -> list[DemoRow]:
    """The rows a demo run wrote into ``folder/results.json``."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `sureid demo --out {folder}` first")
    return [DemoRow(**row) for row in json.loads(path.read_text())]


def mean_rows(runs: list[list[DemoRow]]) -> list[DemoRow]:
    """Every number of the same row averaged over the runs (rows matched by position)."""
    names = [[r.name for r in rows] for rows in runs]
    if any(n != names[0] for n in names):
        raise SystemExit(f"the runs have different rows: {names}")
    out = []
    for position, first in enumerate(runs[0]):
        same = [rows[position] for rows in runs]

        def mean(attr, same=same):
            return statistics.fmean(getattr(r, attr) for r in same)

        check = None
        if first.check:
            check = {
                k: None if first.check[k] is None else statistics.fmean(r.check[k] for r in same)
                for k in first.check
            }
        out.append(
            DemoRow(
                first.name,
                first.keep_rate,
                first.tokens_last_stage,
                mean("rank1"),
                mean("mAP"),
                mean("images_per_second"),
                mean("ms_per_batch"),
                mean("train_seconds"),
                check=check,
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo-seeds", help="one folder per seed in it")
    parser.add_argument("--read", nargs="+", default=None, help="only read these demo folders")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one epoch: a smoke run")
    args = parser.parse_args(argv)
    if args.read:
        folders = [Path(f) for f in args.read]
    else:
        folders = [Path(args.out) / f"seed{seed}" for seed in args.seeds]
        for seed, folder in zip(args.seeds, folders, strict=True):
            if not (folder / "results.json").is_file():
                make = quick_settings if args.quick else DemoSettings
                run_demo(make(out_dir=str(folder), seed=seed))
    runs = [load_rows(folder) for folder in folders]
    for folder, rows in zip(folders, runs, strict=True):
        print(f"\n{folder}\n\n{format_table(rows)}\n\n{format_check_table(rows)}")
    mean = mean_rows(runs)
    print(f"\nmean over {len(runs)} runs\n\n{format_table(mean)}\n\n{format_check_table(mean)}")


if __name__ == "__main__":
    main()
