"""Is the demo's speed column reproducible? Time a finished demo's checkpoints several times.

    python benchmarks/demo_timing.py sureid-demo --runs 2

Each run is what ``sureid demo`` does for its table (``sureid.demo.time_models``: rounds
interleaved, each model timed over about ``--round-seconds`` of back-to-back forwards, the
speed-up over the dense student taken round by round); the script prints each run's speed-ups
with their range over the rounds, and how far apart the runs are. ``--round-seconds 0`` times
single forwards per round, as the demo did before (the comparison).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sureid import SureidModel
from sureid.demo import DemoSettings, speedups, time_models

FOLDERS = ("dense", "hts", "hts_npkd", "hts_npkd_noda", "teacher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", help="a finished `sureid demo --out` folder")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--round-seconds", type=float, default=DemoSettings.timing_round_seconds)
    parser.add_argument("--repeats", type=int, default=DemoSettings.timing_repeats)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {
        name: SureidModel.from_pretrained(Path(args.demo) / name)
        for name in FOLDERS
        if (Path(args.demo) / name / "config.json").is_file()
    }
    size = tuple(next(iter(models.values())).config.image_size)
    s = DemoSettings(
        image_size=size, timing_repeats=args.repeats, timing_round_seconds=args.round_seconds
    )
    print(
        f"{args.demo}: batch {s.timing_batch}, {s.timing_repeats} rounds of about "
        f"{s.timing_round_seconds:g} s per model, {torch.get_num_threads()} threads"
    )
    print("| run | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    medians = []
    for run in range(args.runs):
        speed = speedups(time_models(models, s), "dense")
        medians.append({name: value[0] for name, value in speed.items()})
        cells = [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in speed.values()]
        print(f"| {run + 1} | " + " | ".join(cells) + " |")
    worst = (
        max(
            abs(a[name] - b[name]) / b[name]
            for a, b in zip(medians, medians[1:])
            for name in models
        )
        if len(medians) > 1
        else 0.0
    )
    print(f"largest difference between consecutive runs' speed-ups: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
