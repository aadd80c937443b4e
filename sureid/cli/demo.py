"""``sureid demo``: the paper's Table IV in miniature on the synthetic occluded set."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    """The demo: Table IV of the paper in miniature on the synthetic occluded set."""
    from ..demo import DemoSettings, quick_settings, run_demo

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
    run_demo(settings)
    return 0


def add_parser(sub) -> None:
    """The ``demo`` subcommand."""
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
        "made by tools/make_demo_backbone.py, or 'none' (random weights)",
    )
    demo.add_argument(
        "--teacher-backbone",
        default=None,
        help="the same for the (wider) teacher: 'builtin', a file made by "
        "tools/make_demo_backbone.py --role teacher, or 'none'",
    )
    demo.add_argument("--quick", action="store_true", help="tiny sizes, 1 epoch: a smoke run")
    demo.set_defaults(func=_cmd_demo)
