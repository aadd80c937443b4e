"""``sureid extract``, ``evaluate``, ``visualize``, ``search``: a checkpoint on images or a data set."""

from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "float32", "float16", "bfloat16")
IMAGES_HELP = (
    "image files and/or folders (searched recursively for jpg, jpeg, png, bmp, webp, tif, tiff)"
)
DTYPE_HELP = (
    "precision: auto (on a GPU bfloat16 where supported, else float16; on the CPU float32), "
    "float32, float16, bfloat16"
)


def _quietly(function, *args, **kwargs):
    """Call ``function`` with the library's per-input skip warnings off: the command lists the
    skipped inputs itself, once, in its own terms."""
    import logging

    logger = logging.getLogger("sureid.inference")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return function(*args, **kwargs)
    finally:
        logger.setLevel(level)


def _model_record(model: str) -> str:
    """What a gallery records as its model: a local folder's absolute path, else the hub id."""
    from pathlib import Path

    path = Path(model)
    return str(path.resolve()) if path.is_dir() else str(model)


def _cmd_extract(args: argparse.Namespace) -> int:
    """Extract embeddings of images or a data set split and save them as a searchable gallery;
    under ``accelerate launch`` (several processes) each process embeds its share, and the main
    process merges the shards."""
    import os
    import shutil
    import time
    from pathlib import Path

    from ..gallery import GALLERY_META, GALLERY_WEIGHTS, GalleryIndex
    from ..paths import check_output_folder
    from ..sharding import SHARDS_DIR

    if bool(args.images) == bool(args.dataset):
        raise ValueError("pass either --images PATH... or --dataset NAME --root DIR")
    check_output_folder(args.out, "--out", files=(GALLERY_WEIGHTS, GALLERY_META))
    inputs, ids = _extract_inputs(args)
    start = time.perf_counter()
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1  # accelerate launch / torchrun
    if sharded:
        part = _extract_across_processes(args, inputs, ids)
        if part is None:  # not the main process: its shard is written
            return 0
        part.seconds = time.perf_counter() - start
    else:
        part = _extract_part(args, inputs, ids, 0)
    _print_skipped(part.skipped)
    _check_not_empty(part, args.out)
    index = GalleryIndex(
        part.features, ids=part.ids, model=_model_record(args.model), skipped=part.skipped
    )
    index.save(args.out)
    if sharded:  # merged into the gallery: the shards are done with
        shutil.rmtree(Path(args.out) / SHARDS_DIR)
    print(
        f"saved {len(index)} embeddings (dim {index.dim}) to {args.out} "
        f"({part.images_per_second:.1f} images/s)"
    )
    if part.skipped:
        print(
            f"skipped {len(part.skipped)} of {part.num_inputs} inputs (listed above and in "
            f"{args.out}/{GALLERY_META})",
            file=sys.stderr,
        )
    return 0


def _extract_inputs(args: argparse.Namespace) -> tuple:
    """What extract embeds: (the inputs, their ids: the image paths)."""
    from ..inference import list_images

    if args.images:
        # a missing file is an unreadable input: skipped and listed under --skip-errors
        inputs = list_images(args.images, missing="keep" if args.skip_errors else "raise")
        return inputs, list(inputs)
    if not args.root:
        raise ValueError("--dataset needs --root (the folder that holds the data set)")
    from ..data import load_reid_dataset

    inputs = load_reid_dataset(args.dataset, args.root, splits=[args.split])[args.split]
    return inputs, [str(p) for p in inputs["path"]]


def _extract_part(args, inputs, ids, start: int, progress: bool = True, device=None):
    """Embed ``inputs`` (the inputs from position ``start`` on) with the command's options."""
    from ..sharding import extract_part

    return _quietly(
        extract_part,
        args.model,
        inputs,
        ids,
        start,
        batch_size=args.batch_size,
        device=device or args.device,
        dtype=args.dtype,
        num_workers=args.num_workers,
        progress=progress,
        on_error="skip" if args.skip_errors else "raise",
    )


def _extract_across_processes(args: argparse.Namespace, inputs, ids):
    """This process's shard of the inputs (accelerate's split); the merged gallery part on the
    main process, None on the others."""
    from functools import partial
    from pathlib import Path

    import torch
    from accelerate import PartialState

    from ..sharding import SHARDS_DIR, extract_across_processes

    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    # "auto" on GPUs: each process its own GPU; a bar for the main process only
    device = state.device if args.device == "auto" and not on_cpu else None
    extract = partial(_extract_part, args, progress=state.is_main_process, device=device)
    folder = Path(args.out) / SHARDS_DIR
    return extract_across_processes(state, folder, inputs, ids, _model_record(args.model), extract)


def _check_not_empty(part, out) -> None:
    """An empty gallery is never what was asked for."""
    from ..configuration_sureid import SureidError

    if not len(part.features):
        first = part.skipped[0] if part.skipped else None
        why = f" (first: {first.source}: {first.error})" if first else ""
        raise SureidError(
            f"none of the {part.num_inputs} inputs gave an embedding{why}; nothing was saved "
            f"to {out}"
        )


def _print_skipped(skipped, split: str = "") -> None:
    """List the inputs --skip-errors left out (stderr), once each."""
    for item in skipped:
        print(f"skipped {split}input {item.index} ({item.source}): {item.error}", file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a data set's query / gallery split: table on stdout, JSON file."""
    import json

    from ..data import load_reid_dataset
    from ..evaluation import evaluate_model, protocol_for_dataset
    from ..modeling_sureid import SureidModel
    from ..paths import check_output_file

    if args.out:
        check_output_file(args.out, "--out", example="results.json")
    protocol = protocol_for_dataset(args.dataset) if args.protocol == "auto" else args.protocol
    data = load_reid_dataset(args.dataset, args.root, splits=["query", "gallery"])
    for split in ("query", "gallery"):
        if split not in data:
            raise ValueError(f"{args.dataset} at {args.root} has no {split} split")
    model = SureidModel.from_pretrained(args.model)
    result = _quietly(
        evaluate_model,
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
        dtype=args.dtype,
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


def _is_hts_student(model) -> bool:
    """Whether ``model`` drops tokens (has kept tokens to draw): an HTS student, keep rate < 1."""
    return bool(getattr(model.config, "hts_enabled", False))


def _cmd_visualize(args: argparse.Namespace) -> int:
    """Kept-token overlays of images (or of a data set's first queries); with a data set, also
    the CMC curve and ranked lists."""
    from pathlib import Path

    from ..inference import list_images
    from ..modeling_sureid import SureidModel
    from ..paths import check_output_folder
    from ..visualize import plot_kept_tokens

    if not args.images and not args.dataset:
        raise ValueError("pass --images PATH... and/or --dataset NAME --root DIR")
    if args.dataset and not args.root:
        raise ValueError("--dataset needs --root (the folder that holds the data set)")
    out = Path(args.out)
    check_output_folder(out, "--out")
    images = list_images(args.images) if args.images else None
    model = SureidModel.from_pretrained(args.model)
    written = []
    if images:
        titles = [Path(p).name for p in images]
        written.append(
            plot_kept_tokens(
                model, images, out / "kept_tokens.png", args.stages, titles, device=args.device
            )
        )
    if args.dataset:
        written += _visualize_dataset(args, model, out, draw_kept_tokens=images is None)
    for path in written:
        print(f"wrote {path}")
    return 0


def _visualize_dataset(args: argparse.Namespace, model, out, draw_kept_tokens: bool) -> list:
    """The data set's pictures: the first queries' kept tokens (when ``draw_kept_tokens``: no
    --images), the CMC curve and the ranked lists. Returns the files written."""
    from pathlib import Path

    from ..data import load_reid_dataset
    from ..evaluation import evaluate_model, protocol_for_dataset
    from ..gallery import GalleryIndex
    from ..visualize import plot_cmc, plot_kept_tokens, plot_ranked_results

    data = load_reid_dataset(args.dataset, args.root, splits=("query", "gallery"))
    query, gallery = data["query"], data["gallery"]
    n = min(args.num_queries, len(query))
    written = []
    if draw_kept_tokens and _is_hts_student(model):
        paths = [str(p) for p in query["path"][:n]]
        titles = [Path(p).name for p in paths]
        written.append(
            plot_kept_tokens(
                model, paths, out / "kept_tokens.png", args.stages, titles, device=args.device
            )
        )
    elif draw_kept_tokens:
        print(f"no kept-token figure: {type(model).__name__} drops no tokens", file=sys.stderr)
    result = evaluate_model(
        model,
        query,
        gallery,
        protocol_for_dataset(args.dataset),
        batch_size=args.batch_size,
        device=args.device,
    )
    title = f"CMC ({args.dataset})"
    written.append(plot_cmc(result.metrics, out / "cmc.png", max_rank=20, title=title))
    hits = GalleryIndex(result.gallery_features).search(result.query_features[:n], k=args.top_k)
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
    return written


def _cmd_search(args: argparse.Namespace) -> int:
    """Rank a saved gallery for query images: a table per query, and a picture with --out."""
    from ..inference import extract_features, list_images
    from ..paths import check_output_file
    from .index import open_search_target

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.out:
        check_output_file(args.out, "--out", example="ranked.png")
    gallery = open_search_target(args)  # --gallery or --index (cli/index.py)
    model = _search_model(args, gallery)
    queries = list_images(args.images)
    if args.out:
        _check_drawable(gallery)
    features = _quietly(
        extract_features,
        model,
        queries,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    hits = gallery.search(features, k=args.top_k)
    for q, (path, ids, scores) in enumerate(zip(queries, hits.ids, hits.scores.tolist())):
        if q:
            print()
        print(f"query {q + 1}/{len(queries)}: {path}")
        print(f"{'rank':>6}  {'score':>6}  gallery id")
        for rank, (gid, score) in enumerate(zip(ids, scores), start=1):
            print(f"{rank:6d}  {score:6.3f}  {gid}")
    if args.out:
        print(f"wrote {_draw_search(queries, gallery, hits, args.out)}")
    return 0


def _search_model(args: argparse.Namespace, gallery):
    """The model to embed the queries with: --model, else the one the gallery records."""
    from pathlib import Path

    from ..configuration_sureid import SureidError
    from ..gallery import GALLERY_META

    model = args.model or gallery.model
    meta = Path(args.gallery) / GALLERY_META if args.gallery else Path(args.index) / "index.json"
    if model is None:
        raise SureidError(
            f"{meta} does not record the model that made it (a gallery saved before sureid "
            "extract recorded it, or by GalleryIndex.save without model=); pass --model, the "
            "checkpoint the gallery was extracted with"
        )
    if not args.model and Path(model).is_absolute() and not Path(model).exists():
        raise FileNotFoundError(
            f"the model recorded in {meta}, {model}, is not there any more; pass --model, the "
            "checkpoint the gallery was extracted with"
        )
    if args.model and gallery.model and _model_record(args.model) != _model_record(gallery.model):
        print(
            f"note: the gallery was extracted with {gallery.model}; searching it with "
            f"{args.model} (scores are only meaningful for features of the same model)",
            file=sys.stderr,
        )
    return model


def _check_drawable(gallery) -> None:
    """--out draws the ranked gallery images: the gallery's ids must be image paths."""
    from ..configuration_sureid import SureidError

    not_paths = [i for i in gallery.ids if not isinstance(i, str)]
    if not_paths:
        raise SureidError(
            f"--out: the gallery's ids are not image paths (e.g. {not_paths[0]!r}), so the "
            "ranked images cannot be drawn; leave --out out for the table, or extract the "
            "gallery with sureid extract (ids = image paths)"
        )


def _draw_search(queries, gallery, hits, out):
    """The ranked-list picture of a search; the ranked gallery images must be found."""
    from pathlib import Path

    from ..visualize import plot_ranked_results

    shown = sorted({i for row in hits.ids for i in row})
    missing = [p for p in shown if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--out: gallery image {missing[0]} not found ({len(missing)} of the ranked images "
            "are missing): the gallery's ids are the paths given to sureid extract, so run "
            "search from the folder extract ran in (or extract with absolute paths)"
        )
    return plot_ranked_results(queries, gallery.ids, hits.indices, out, scores=hits.scores)


def add_parsers(sub) -> None:
    """Parser entries of extract, evaluate, visualize and search."""
    for add in (_add_extract, _add_evaluate, _add_visualize, _add_search):
        add(sub)


def _add_extract(sub) -> None:
    ext = sub.add_parser("extract", help="embeddings of images or a data set split -> gallery")
    ext.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ext.add_argument("--images", nargs="+", default=None, metavar="PATH", help=IMAGES_HELP)
    ext.add_argument("--dataset", default=None, help="data set name (see docs/datasets.md)")
    ext.add_argument("--root", default=None, help="folder that holds the data set")
    ext.add_argument(
        "--split",
        default="gallery",
        choices=("train", "query", "gallery"),
        help="which split of --dataset to embed (default: gallery)",
    )
    ext.add_argument("--out", required=True, help="output folder (GalleryIndex.save)")
    ext.add_argument("--batch-size", type=int, default=64)
    ext.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ext.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    ext.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    ext.add_argument(
        "--skip-errors", action="store_true", help="leave unreadable images out (and list them)"
    )
    ext.set_defaults(func=_cmd_extract)


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="CMC / mAP / mINP of a checkpoint on a data set")
    ev.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ev.add_argument("--dataset", required=True, help="data set name (see docs/datasets.md)")
    ev.add_argument("--root", required=True, help="folder that holds the data set")
    ev.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    ev.add_argument("--protocol", default="auto", choices=("auto", "market", "cross"))
    ev.add_argument("--max-rank", type=int, default=50)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ev.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    ev.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    ev.add_argument("--rerank-max-memory-gb", type=float, default=8.0)
    ev.add_argument("--out", default=None, help="write the numbers to this JSON file")
    ev.add_argument(
        "--skip-errors",
        action="store_true",
        help="leave unreadable images out of the evaluation (and list them)",
    )
    ev.set_defaults(func=_cmd_evaluate)


def _add_visualize(sub) -> None:
    vis = sub.add_parser("visualize", help="kept-token overlays, CMC curve, ranked lists (PNG)")
    vis.add_argument("--model", required=True, help="checkpoint directory or hub id")
    vis.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="PATH",
        help=f"draw the kept tokens of these; {IMAGES_HELP}",
    )
    vis.add_argument("--stages", default="all", choices=("all", "final"))
    vis.add_argument(
        "--dataset",
        default=None,
        help="also draw the CMC curve and ranked lists (without --images: the kept tokens of "
        "the first --num-queries queries too)",
    )
    vis.add_argument("--root", default=None, help="folder that holds the data set")
    vis.add_argument("--num-queries", type=int, default=4)
    vis.add_argument("--top-k", type=int, default=8)
    vis.add_argument("--batch-size", type=int, default=64)
    vis.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    vis.add_argument("--out", required=True, help="output folder for the PNG files")
    vis.set_defaults(func=_cmd_visualize)


def _add_search(sub) -> None:
    from .index import add_search_target

    sea = sub.add_parser("search", help="rank a saved gallery (sureid extract) for query images")
    add_search_target(sea)  # --gallery DIR or --index DIR (sureid index build), --nprobe, ...
    sea.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help=f"query images; {IMAGES_HELP}"
    )
    sea.add_argument("--top-k", type=int, default=10, help="gallery entries per query")
    sea.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or hub id (default: the one recorded in the gallery)",
    )
    sea.add_argument("--out", default=None, help="also draw the ranked lists to this PNG file")
    sea.add_argument("--batch-size", type=int, default=64)
    sea.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sea.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    sea.set_defaults(func=_cmd_search)
