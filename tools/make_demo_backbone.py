"""Make a pretrained backbone `sureid demo` starts from (the files in sureid/assets).

The demo runs offline, so it cannot start from ImageNet weights as the paper does; it starts from
this small dense ViT instead, trained here on a synthetic set of people who are not in the demo's
data (another seed). A maintainer's tool, run from the repository root; the shipped files were
made with the defaults on 2 CPU cores (the students' in about 40 minutes, the twice as wide
teacher's in about 53; the recipe is in each file's metadata):

    python tools/make_demo_backbone.py --out sureid/assets/demo_backbone.safetensors
    python tools/make_demo_backbone.py --role teacher \
        --out sureid/assets/demo_teacher_backbone.safetensors
"""

from __future__ import annotations

import argparse

import torch

from sureid.demo import BUILTIN_BACKBONE, DemoSettings, pretrain_backbone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BUILTIN_BACKBONE))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--num-ids", type=int, default=256)
    parser.add_argument(
        "--seed", type=int, default=1000, help="the demo refuses to run with this seed"
    )
    parser.add_argument(
        "--role", default="student", choices=("student", "teacher"), help="whose shape"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--work-dir", default=None, help="data and trainer files (default: beside --out)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain_backbone(
        args.out,
        DemoSettings(),
        steps=args.steps,
        num_ids=args.num_ids,
        seed=args.seed,
        learning_rate=args.learning_rate,
        work_dir=args.work_dir,
        role=args.role,
    )


if __name__ == "__main__":
    main()
