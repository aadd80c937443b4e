"""Evaluate a checkpoint on a ReID benchmark (R1 / R5 / R10 / mAP / mINP), as `sureid evaluate`.

    python examples/evaluate.py --model path/to/checkpoint --dataset occluded_duke --root /data
    python examples/evaluate.py --model path/to/checkpoint --dataset occluded_reid --root /data \
        --rerank --cmc-plot cmc.png

The protocol follows the data set (Market / Duke / Occluded-Duke: same-camera matches removed;
Occluded-REID / Partial-REID: no camera filtering); see docs/inference.md.
"""

from __future__ import annotations

import argparse
import json

from sureid import SureidModel, evaluate_model, protocol_for_dataset
from sureid.data import load_reid_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--rerank", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--cmc-plot", default=None, help="draw the CMC curve here (PNG)")
    args = parser.parse_args()

    data = load_reid_dataset(args.dataset, args.root)
    model = SureidModel.from_pretrained(args.model)
    result = evaluate_model(
        model,
        data["query"],
        data["gallery"],
        protocol=protocol_for_dataset(args.dataset),
        rerank=args.rerank,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    if args.cmc_plot:
        from sureid.visualize import plot_cmc

        plot_cmc(result.metrics, args.cmc_plot, max_rank=20, title=args.dataset)


if __name__ == "__main__":
    main()
