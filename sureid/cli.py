"""The ``sureid`` command: a thin shell over the library. Subcommands grow with the project.

Errors a user can cause and fix (a bad path, a corrupt file, a wrong value) print one line,
``sureid <command>: error: ...``, and exit with status 2; ``--debug`` (anywhere on the line) or
``SUREID_DEBUG=1`` lets them through with their traceback. Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    """The demo: Table IV of the paper in miniature on the synthetic occluded set."""
    from .demo import DemoSettings, quick_settings, run_demo

    # --quick: a smoke run of every step (tests); the numbers mean nothing
    make = quick_settings if args.quick else DemoSettings
    settings = make(out_dir=args.out, seed=args.seed, threads=args.threads)
    if args.teacher_epochs is not None:
        settings.teacher_epochs = args.teacher_epochs
    if args.student_epochs is not None:
        settings.student_epochs = args.student_epochs
    if args.hts_epochs is not None:
        settings.hts_epochs = args.hts_epochs
    if args.backbone is not None:
        settings.backbone = None if args.backbone == "none" else args.backbone
    if args.teacher_backbone is not None:
        settings.teacher_backbone = (
            None if args.teacher_backbone == "none" else args.teacher_backbone
        )
    if args.token_guidance is not None:
        settings.token_guidance = args.token_guidance
    run_demo(settings)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Train a teacher or distil a student: the same recipe as examples/train_*.py."""
    from .trainer import train_main

    train_main(args.rest, role=args.role)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    """Import ImageNet ViT/DeiT weights from timm into a SUREID checkpoint directory."""
    from .modeling_sureid import SureidStudentModel, SureidTeacherModel

    cls = SureidStudentModel if args.role == "student" else SureidTeacherModel
    overrides = {"image_size": tuple(args.image_size), "num_identities": args.num_identities}
    if args.stride is not None:
        overrides["stride_size"] = args.stride
    if args.role == "student":
        overrides["keep_rate"] = args.keep_rate
    try:
        model = cls.from_timm(args.timm_name, checkpoint=args.checkpoint, **overrides)
    except OSError as err:  # offline: timm could not download the weights
        if args.checkpoint is not None:
            raise
        raise OSError(
            f"cannot download timm's ImageNet weights of {args.timm_name!r} "
            f"({err.__cause__ or err}); offline, pass --checkpoint FILE (a local .pth or "
            ".safetensors of those weights)"
        ) from err
    model.save_pretrained(args.out)
    print(f"saved {cls.__name__} ({args.timm_name}) to {args.out}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    """Extract embeddings of images or a data set split and save them as a searchable gallery."""
    from .configuration_sureid import SureidError
    from .inference import GalleryIndex, extract_features

    if bool(args.images) == bool(args.dataset):
        raise ValueError("pass either --images PATH... or --dataset NAME --root DIR")
    if args.images:
        inputs, ids = list(args.images), [str(p) for p in args.images]
    else:
        if not args.root:
            raise ValueError("--dataset needs --root (the folder that holds the data set)")
        from .data import load_reid_dataset

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

    from .data import load_reid_dataset
    from .evaluation import evaluate_model, protocol_for_dataset
    from .modeling_sureid import SureidModel

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

    from .modeling_sureid import SureidModel
    from .visualize import plot_cmc, plot_kept_tokens, plot_ranked_results

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
        from .data import load_reid_dataset
        from .evaluation import evaluate_model, protocol_for_dataset
        from .inference import GalleryIndex

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


def _cmd_benchmark(args: argparse.Namespace) -> int:
    """Throughput table: timm's dense DeiT-S, the student at each keep rate, ViT-B, onnxruntime."""
    from .benchmark import command_line, main_from_args

    return main_from_args(args, command_line(args, "sureid benchmark"))


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export a checkpoint's inference graph (true token dropping) to ONNX, dynamic batch."""
    from .export import export_onnx, verify_onnx
    from .modeling_sureid import SureidModel

    model = SureidModel.from_pretrained(args.model).eval()
    path = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {path} ({type(model).__name__}, opset {args.opset}, dynamic batch)")
    if args.verify:
        for batch_size, diff in verify_onnx(model, path, batch_sizes=(1, 3)).items():
            print(f"onnxruntime vs PyTorch, batch {batch_size}: max |embedding diff| {diff:.2e}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    """The model zoo: the table of checkpoints, or one entry's commands (``zoo show ID``)."""
    from .zoo import format_entry, format_zoo_table, get_entry

    if args.zoo_command == "show":
        print(format_entry(get_entry(args.id), data_root=args.data_root))
    else:
        print(format_zoo_table())
        print("\nsureid zoo show ID prints an entry's commands; docs/zoo.md explains the statuses")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Upload a checkpoint folder (weights and model card) to the Hugging Face Hub."""
    from .zoo import push_checkpoint

    info = push_checkpoint(args.model, args.repo_id, private=args.private, revision=args.revision)
    url = getattr(info, "commit_url", None) or str(info)
    revision = f", revision={args.revision!r}" if args.revision else ""
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    print(f"load it with SureidModel.from_pretrained({args.repo_id!r}{revision})")
    return 0


def _add_zoo_commands(sub) -> None:
    """Parser entries of zoo and push."""
    zoo = sub.add_parser("zoo", help="the model zoo: the paper's checkpoints and the demo's")
    zoo_sub = zoo.add_subparsers(dest="zoo_command")
    show = zoo_sub.add_parser("show", help="one entry and its training commands, ready to paste")
    show.add_argument("id", help="a zoo id, e.g. sureid-deit-occduke")
    show.add_argument(
        "--data-root", default=None, help="put this folder in the commands instead of /data"
    )
    zoo.set_defaults(func=_cmd_zoo)

    push = sub.add_parser(
        "push", help="upload a checkpoint folder (weights and model card) to the Hugging Face Hub"
    )
    push.add_argument("--model", required=True, help="checkpoint folder (with README.md)")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to upload to (default: main)")
    push.set_defaults(func=_cmd_push)


def _add_inference_commands(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sureid", description="Occluded person ReID with HTS.")
    parser.add_argument("--version", action="version", version=f"sureid {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also SUREID_DEBUG=1; may follow the command)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="the demo: train a teacher and four students on the synthetic occluded set and "
        "print the paper's Table IV in miniature (CPU; see docs/training.md#the-demo)",
    )
    demo.add_argument(
        "--out", default="sureid-demo", help="output folder (report, figures, models)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    demo.add_argument("--teacher-epochs", type=float, default=None)
    demo.add_argument("--student-epochs", type=float, default=None, help="the dense student's")
    demo.add_argument(
        "--hts-epochs", type=float, default=None, help="the HTS students' (from the dense one)"
    )
    demo.add_argument(
        "--backbone",
        default=None,
        help="pretrained encoder the dense student starts from: 'builtin' (default), a file "
        "made by examples/make_demo_backbone.py, or 'none' (random weights)",
    )
    demo.add_argument(
        "--teacher-backbone",
        default=None,
        help="the same for the (wider) teacher: 'builtin', a file made by "
        "examples/make_demo_backbone.py --role teacher, or 'none'",
    )
    demo.add_argument(
        "--token-guidance",
        default=None,
        choices=("rollout", "cls-attention", "attention-norm", "none"),
        help="how the HTS students' predictors are guided; 'none' = the paper's recipe",
    )
    demo.add_argument("--quick", action="store_true", help="tiny sizes, 1 epoch: a smoke run")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser(
        "train",
        help="train a teacher or distil a student (options: sureid train teacher --help)",
    )
    train.add_argument("role", choices=("teacher", "student"))
    train.add_argument("rest", nargs=argparse.REMAINDER, help="options of examples/train_*.py")
    train.set_defaults(func=_cmd_train)

    conv = sub.add_parser("convert", help="import ImageNet ViT/DeiT weights from timm")
    conv.add_argument("--timm-name", required=True, help="e.g. deit_small_distilled_patch16_224")
    conv.add_argument(
        "--checkpoint",
        default=None,
        help=".pth/.safetensors file; omitted: timm downloads its pretrained weights",
    )
    conv.add_argument("--role", choices=("student", "teacher"), default="student")
    conv.add_argument("--out", required=True, help="output directory (save_pretrained)")
    conv.add_argument("--image-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    conv.add_argument("--stride", type=int, default=None, help="patch stride (12 = overlapping)")
    conv.add_argument("--keep-rate", type=float, default=0.7)
    conv.add_argument("--num-identities", type=int, default=0)
    conv.set_defaults(func=_cmd_convert)
    _add_inference_commands(sub)

    from .benchmark import add_arguments as add_benchmark_arguments

    bench = sub.add_parser(
        "benchmark",
        help="throughput table: timm DeiT-S vs the student at each keep rate (docs/benchmarks.md)",
    )
    add_benchmark_arguments(bench)
    bench.set_defaults(func=_cmd_benchmark)

    onnx = sub.add_parser("export-onnx", help="export a checkpoint to ONNX (true token dropping)")
    onnx.add_argument("--model", required=True, help="checkpoint directory or hub id")
    onnx.add_argument("--out", required=True, help="output .onnx file")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the onnxruntime-vs-PyTorch check (it needs onnxruntime)",
    )
    onnx.set_defaults(func=_cmd_export_onnx)
    _add_zoo_commands(sub)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: a bad path, a corrupt file, a wrong value, a missing extra.

    SureidError is a ValueError; config checks raise ValueError; a missing file, a folder that
    is not a checkpoint, the Hub unreachable raise OSError; a damaged weights file raises
    safetensors' own error (which derives from neither).
    """
    from safetensors import SafetensorError

    return (ValueError, OSError, ImportError, SafetensorError)


def _one_line(err: BaseException, args: argparse.Namespace) -> str:
    """The error's message on one line, with library hints put in CLI terms."""
    text = str(err) or type(err).__name__
    if "on_error='skip'" in text:
        from .inference import SKIP_HINT

        flag = "(pass --skip-errors to leave bad inputs out and list them)"
        text = text.replace(SKIP_HINT, flag if hasattr(args, "skip_errors") else "").strip()
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sureid`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SUREID_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    if debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sureid {args.command}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        print(
            f"sureid {args.command}: error: {_one_line(err, args)} (--debug for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
