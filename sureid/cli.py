"""The ``sureid`` command: a thin shell over the library. Subcommands grow with the project."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    """Build a dense model and an HTS student from configs and compare them on random images."""
    import torch

    from .benchmark import time_forward
    from .configuration_sureid import SureidStudentConfig
    from .modeling_sureid import SureidStudentModel

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(
        image_size=(256, 128),
        hidden_size=args.hidden_size,
        num_hidden_layers=12,
        num_attention_heads=args.hidden_size // 64,
    )
    dense = SureidStudentModel(SureidStudentConfig(keep_rate=1.0, **common)).eval()
    student = SureidStudentModel(SureidStudentConfig(keep_rate=args.keep_rate, **common)).eval()
    student.encoder.load_state_dict(dense.encoder.state_dict())
    pixels = torch.randn(args.batch_size, 3, 256, 128)
    cfg = student.config
    print(
        f"SUREID demo (random weights, random images): ViT hidden {args.hidden_size}, 12 blocks, "
        f"256x128, patch 16 -> {cfg.num_patches} image tokens; batch {args.batch_size}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"keep rate p = {cfg.keep_rate}: stages before blocks {cfg.sparsify_layers} (0-based)")
    with torch.inference_mode():
        out = student(pixels)
    for j, (layer, idx) in enumerate(zip(cfg.sparsify_layers, out.kept_indices)):
        print(
            f"  stage {j + 1} (before block {layer + 1}): keeps {idx.shape[1]:3d} / "
            f"{cfg.num_patches} image tokens (target p^{j + 1} = {cfg.stage_keep_ratios[j]:.3f})"
        )
    rows = []
    for name, model in (("dense (keep 1.0)", dense), (f"student (keep {cfg.keep_rate})", student)):
        rows.append((name, time_forward(model, pixels, repeats=args.repeats, warmup=1)))
    base = rows[0][1].median_ms
    print(
        f"\n{'model':<22} {'ms/batch (median)':>18} {'min..max':>16} {'img/s':>8} {'speed-up':>9}"
    )
    for name, t in rows:
        spread = f"{t.min_ms:.0f}..{t.max_ms:.0f}"
        print(
            f"{name:<22} {t.median_ms:>18.1f} {spread:>16} {t.images_per_second:>8.1f} "
            f"{base / t.median_ms:>8.2f}x"
        )
    bound = sum(dense.config.tokens_per_block()) / sum(cfg.tokens_per_block())
    print(f"\ntoken-count bound on the speed-up (linear terms): {bound:.2f}x")
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
    model = cls.from_timm(args.timm_name, checkpoint=args.checkpoint, **overrides)
    model.save_pretrained(args.out)
    print(f"saved {cls.__name__} ({args.timm_name}) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sureid", description="Occluded person ReID with HTS.")
    parser.add_argument("--version", action="version", version=f"sureid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: dense model vs HTS student, side by side")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--keep-rate", type=float, default=0.7)
    demo.add_argument("--hidden-size", type=int, default=384, help="384 = DeiT-S, 768 = ViT-B")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sureid`` console script."""
    from .configuration_sureid import SureidError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SureidError, FileNotFoundError, ValueError) as err:
        print(f"sureid {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
