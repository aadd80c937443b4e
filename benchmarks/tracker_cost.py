"""What the appearance model costs a tracker per frame: dense student vs SUREID vs no re-ID.

    python benchmarks/tracker_cost.py --video vtest.avi --demo sureid-demo

Each row is a ``SureidReIDEncoder`` timed by ``sureid.tracking.appearance_cost``: crop, resize
and normalise N person boxes (65x130 px) of one frame, then one forward, for N = 1, 8, 32,
every (model, N) timed round-robin in one run, the speed-up the median of per-round ratios
against the dense row. Two pairs of rows:

- **deployment size**: the zoo's students, DeiT-S at 256x128 (patch 16, 128 image tokens), at
  keep 1.0 (dense) and keep 0.7 (SUREID); random weights (speed does not depend on them), the
  same encoder weights in both;
- **demo size** (``--demo``): the demo's ``dense`` and ``hts_npkd_noda`` (SUREID) checkpoints,
  hidden 96, 128x64, the models ``examples/track_video.py`` runs by default.

The frame is ``--video``'s first (e.g. OpenCV's vtest.avi, 768x576), else a 768x576 frame of
noise: the content changes nothing but the crops' pixels. docs/benchmarks.md quotes the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sureid import SureidModel, SureidReIDEncoder, SureidStudentConfig, SureidStudentModel
from sureid.benchmark import environment
from sureid.inference import resolve_autocast_dtype
from sureid.tracking import appearance_cost, read_frame


def deployment_pair(device: str) -> dict[str, SureidReIDEncoder]:
    """DeiT-S students at 256x128, keep 1.0 and 0.7, sharing their encoder weights."""
    torch.manual_seed(0)
    sureid = SureidStudentModel(SureidStudentConfig(keep_rate=0.7)).eval()
    dense = SureidStudentModel(SureidStudentConfig(keep_rate=1.0)).eval()
    dense.load_state_dict(sureid.state_dict(), strict=False)  # all but the predictors
    return {
        "DeiT-S dense (keep 1.0)": SureidReIDEncoder(dense, device=device),
        "DeiT-S SUREID (keep 0.7)": SureidReIDEncoder(sureid, device=device),
    }


def demo_pair(folder: Path, device: str) -> dict[str, SureidReIDEncoder]:
    return {
        "demo dense": SureidReIDEncoder(
            SureidModel.from_pretrained(folder / "dense"), device=device
        ),
        "demo SUREID": SureidReIDEncoder(
            SureidModel.from_pretrained(folder / "hts_npkd_noda"), device=device
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=None, help="take the first frame of this video")
    parser.add_argument("--demo", type=Path, default=None, help="a finished `sureid demo` folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.video:
        frame = read_frame(args.video)
    else:
        frame = np.random.default_rng(0).integers(0, 256, (576, 768, 3), dtype=np.uint8)
    dev = torch.device(args.device)
    # the encoders' own precision: float32 on the CPU, autocast (bf16 / fp16) on a GPU
    dtype = resolve_autocast_dtype(dev, None) or torch.float32
    for key, value in environment(dev, dtype).items():
        print(f"- {key}: {value}")
    pairs = [deployment_pair(args.device)]
    if args.demo is not None:
        pairs.append(demo_pair(args.demo, args.device))
    for pair in pairs:
        encoders = {**pair, "no re-ID": None}
        cost = appearance_cost(encoders, frame, repeats=args.repeats, warmup=args.warmup)
        print()
        print(cost.table())


if __name__ == "__main__":
    main()
