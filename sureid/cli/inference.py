"""``sureid extract``, ``sureid evaluate``, ``sureid visualize``: a checkpoint on images or a data set."""

from __future__ import annotations

import argparse
import sys


def _cmd_extract(args: argparse.Namespace) -> int:
    """Extract embeddings of images or a data set split and save them as a searchable gallery."""
    from ..configuration_sureid import SureidError
    from ..gallery import GalleryIndex
    from ..inference import extract_features

    if bool(args.images) == bool(args.dataset):
        raise ValueError("pass either --images PATH... or --dataset NAME --root DIR")
    if args.images:
        inputs, ids = list(args.images), [str(p) for p in args.images]
    else:
        if not args.root:
            raise ValueError("--dataset needs --root (the folder that holds the data set)")
        from ..data import load_reid_dataset

        inputs = load_reid_dataset(args.dataset, args.root, splits=[args.split])[args.split]
        ids = [str(p) for p in inputs["path"]]
    result = extract_features(
        args.model,
        inputs,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        on_error="skip" if args.skip_errors else "raise",
        return_kept=True,
    )
    _print_skipped(result.skipped)
    if not len(result.features):  # an empty gallery is never what was asked for
        first = result.skipped[0] if result.skipped else None
        why = f" (first: {first.source}: {first.error})" if first else ""
        raise SureidError(
            f"none of the {result.num_inputs} inputs gave an embedding{why}; nothing was saved "
            f"to {args.out}"
        )
    index = GalleryIndex(result.features, ids=[ids[i] for i in result.indices.tolist()])
    index.save(args.out)
    print(
        f"saved {len(index)} embeddings (dim {index.dim}) to {args.out} "
        f"({result.images_per_second:.1f} images/s)"
    )
    return 0


def _print_skipped(skipped, split: str = "") -> None:
    """List the inputs --skip-errors left out (stderr), then their count."""
    for item in skipped:
        print(f"skipped {split}input {item.index} ({item.source}): {item.error}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable {split}inputs", file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a data set's query / gallery split: table on stdout, JSON file."""
    import json

    from ..data import load_reid_dataset
    from ..evaluation import evaluate_model, protocol_for_dataset
    from ..modeling_sureid import SureidModel

    protocol = protocol_for_dataset(args.dataset) if args.protocol == "auto" else args.protocol
    data = load_reid_dataset(args.dataset, args.root, splits=["query", "gallery"])
    for split in ("query", "gallery"):
        if split not in data:
            raise ValueError(f"{args.dataset} at {args.root} has no {split} split")
    model = SureidModel.from_pretrained(args.model)
    result = evaluate_model(
        model,
        data["query"],
        data["gallery"],
        protocol=protocol,
        max_rank=args.max_rank,
        rerank=args.rerank,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        rerank_max_memory_gb=args.rerank_max_memory_gb,
        on_error="skip" if args.skip_errors else "raise",
    )
    for split, items in result.skipped.items():
        _print_skipped(items, f"{split} ")
    print(f"{type(model).__name__} from {args.model} on {args.dataset} ({args.root})")
    print(result.table())
    if args.out:
        from pathlib import Path

        report = {"model": str(args.model), "dataset": args.dataset, "root": str(args.root)}
        report.update(result.to_dict())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)  # to_dict: NaN -> null
        print(f"wrote {args.out}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    """Kept-token overlays of images; with a data set, also the CMC curve and ranked lists."""
    from pathlib import Path

    from ..modeling_sureid import SureidModel
    from ..visualize import plot_cmc, plot_kept_tokens, plot_ranked_results

    if not args.images and not args.dataset:
        raise ValueError("pass --images PATH... and/or --dataset NAME --root DIR")
    out = Path(args.out)
    model = SureidModel.from_pretrained(args.model)
    written = []
    if args.images:
        titles = [Path(p).name for p in args.images]
        written.append(
            plot_kept_tokens(model, args.images, out / "kept_tokens.png", args.stages, titles)
        )
    if args.dataset:
        if not args.root:
            raise ValueError("--dataset needs --root (the folder that holds the data set)")
        from ..data import load_reid_dataset
        from ..evaluation import evaluate_model, protocol_for_dataset
        from ..gallery import GalleryIndex

        data = load_reid_dataset(args.dataset, args.root, splits=("query", "gallery"))
        query, gallery = data["query"], data["gallery"]
        result = evaluate_model(
            model,
            query,
            gallery,
            protocol_for_dataset(args.dataset),
            batch_size=args.batch_size,
            device=args.device,
        )
        qf, gf = result.query_features, result.gallery_features
        written.append(
            plot_cmc(result.metrics, out / "cmc.png", max_rank=20, title=f"CMC ({args.dataset})")
        )
        n = min(args.num_queries, len(query))
        hits = GalleryIndex(gf).search(qf[:n], k=args.top_k)
        written.append(
            plot_ranked_results(
                list(query["path"][:n]),
                list(gallery["path"]),
                hits.indices,
                out / "ranked.png",
                query_pids=list(query["pid"][:n]),
                gallery_pids=list(gallery["pid"]),
                scores=hits.scores,
            )
        )
    for path in written:
        print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
    """Parser entries of extract, evaluate and visualize."""
    ext = sub.add_parser("extract", help="embeddings of images or a data set split -> gallery")
    ext.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ext.add_argument("--images", nargs="+", default=None, metavar="PATH")
    ext.add_argument("--dataset", default=None, help="data set name (see docs/datasets.md)")
    ext.add_argument("--root", default=None, help="folder that holds the data set")
    ext.add_argument("--split", default="gallery", choices=("train", "query", "gallery"))
    ext.add_argument("--out", required=True, help="output folder (GalleryIndex.save)")
    ext.add_argument("--batch-size", type=int, default=64)
    ext.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ext.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    ext.add_argument(
        "--skip-errors", action="store_true", help="leave unreadable images out (and list them)"
    )
    ext.set_defaults(func=_cmd_extract)

    ev = sub.add_parser("evaluate", help="CMC / mAP / mINP of a checkpoint on a data set")
    ev.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ev.add_argument("--dataset", required=True, help="data set name (see docs/datasets.md)")
    ev.add_argument("--root", required=True, help="folder that holds the data set")
    ev.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    ev.add_argument("--protocol", default="auto", choices=("auto", "market", "cross"))
    ev.add_argument("--max-rank", type=int, default=50)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ev.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    ev.add_argument("--rerank-max-memory-gb", type=float, default=8.0)
    ev.add_argument("--out", default=None, help="write the numbers to this JSON file")
    ev.add_argument(
        "--skip-errors",
        action="store_true",
        help="leave unreadable images out of the evaluation (and list them)",
    )
    ev.set_defaults(func=_cmd_evaluate)

    vis = sub.add_parser("visualize", help="kept-token overlays, CMC curve, ranked lists (PNG)")
    vis.add_argument("--model", required=True, help="checkpoint directory or hub id")
    vis.add_argument("--images", nargs="+", default=None, metavar="PATH")
    vis.add_argument("--stages", default="all", choices=("all", "final"))
    vis.add_argument("--dataset", default=None, help="also draw the CMC curve and ranked lists")
    vis.add_argument("--root", default=None, help="folder that holds the data set")
    vis.add_argument("--num-queries", type=int, default=4)
    vis.add_argument("--top-k", type=int, default=8)
    vis.add_argument("--batch-size", type=int, default=64)
    vis.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    vis.add_argument("--out", required=True, help="output folder for the PNG files")
    vis.set_defaults(func=_cmd_visualize)
