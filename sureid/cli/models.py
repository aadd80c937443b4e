"""``sureid convert``, ``sureid benchmark``, ``sureid export-onnx``: models in and out."""

from __future__ import annotations

import argparse


def _cmd_convert(args: argparse.Namespace) -> int:
    """Import ImageNet ViT/DeiT weights from timm into a SUREID checkpoint directory."""
    from ..modeling_sureid import SureidStudentModel, SureidTeacherModel

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


_BENCHMARK_HELP = (
    "throughput table: timm DeiT-S vs the student at each keep rate (docs/benchmarks.md; "
    "options: sureid benchmark --help)"
)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    """Throughput table: timm's dense DeiT-S, the student at each keep rate, ViT-B, onnxruntime.

    Its options are ``sureid.benchmark``'s own, parsed here from what ``main`` passed on, so
    that building the ``sureid`` parser does not load the benchmark (and torch)."""
    from ..benchmark import add_arguments, command_line, main_from_args

    parser = argparse.ArgumentParser(prog="sureid benchmark", description=_BENCHMARK_HELP)
    options = add_arguments(parser).parse_args(args.extra)
    return main_from_args(options, command_line(options, "sureid benchmark"))


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export a checkpoint's inference graph (true token dropping) to ONNX, dynamic batch."""
    from ..export import export_onnx, verify_onnx
    from ..modeling_sureid import SureidModel
    from ..paths import check_output_file

    check_output_file(args.out, "--out", example="model.onnx")
    model = SureidModel.from_pretrained(args.model).eval()
    path = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {path} ({type(model).__name__}, opset {args.opset}, dynamic batch)")
    if args.verify:
        for batch_size, diff in verify_onnx(model, path, batch_sizes=(1, 3)).items():
            print(f"onnxruntime vs PyTorch, batch {batch_size}: max |embedding diff| {diff:.2e}")
    return 0


def add_parsers(sub) -> None:
    """The ``convert``, ``benchmark`` and ``export-onnx`` subcommands."""
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
    bench = sub.add_parser("benchmark", add_help=False, help=_BENCHMARK_HELP)
    bench.set_defaults(func=_cmd_benchmark, forwards_options=True)

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
