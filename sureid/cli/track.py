"""``sureid track``: people tracking in a video with SUREID embeddings (BoxMOT's trackers),
compared with other checkpoints and with no re-ID, and what the appearance model costs."""

from __future__ import annotations

import argparse

from .inference import DTYPE_HELP, DTYPES


def _load_encoders(args: argparse.Namespace) -> dict:
    """Mode name -> encoder: --model first (its tracks are written), then each --compare, then
    the no-re-ID baseline (None) unless --without-no-reid-baseline."""
    from ..encoder import SureidReIDEncoder
    from ..tracking import NO_REID, mode_names

    models = [args.model, *args.compare]
    encoders: dict = {}
    for label, model in zip(mode_names(models), models):
        encoders[label] = SureidReIDEncoder.from_pretrained(
            model, device=args.device, dtype=args.dtype
        )
    if args.no_reid_baseline:
        encoders[NO_REID] = None
    return encoders


def _cmd_track(args: argparse.Namespace) -> int:
    """Check the inputs and --out, load the encoders, print the appearance cost, then track."""
    import time

    import torch

    from .. import tracking
    from ..paths import check_output_folder

    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_folder(args.out, "--out", files=tracking.OUTPUT_FILES)
    # read before the models load: a bad video or detections file fails in a second
    frame = tracking.read_frame(args.video)
    if args.detections:
        tracking.read_mot_detections(args.detections)  # checked now; track_video reads it again
    encoders = _load_encoders(args)
    labels = list(encoders)
    if args.cost_repeats:
        baseline = labels[1] if len(args.compare) else labels[0]  # the first --compare: dense
        cost = tracking.appearance_cost(
            encoders, frame, repeats=args.cost_repeats, baseline=baseline
        )
        print(cost.table() + "\n", flush=True)
    start = time.perf_counter()
    result = tracking.track_video(
        args.video,
        encoders,
        detections=args.detections,
        tracker=args.tracker,
        max_frames=args.max_frames,
        out_dir=args.out,
        annotated_video=args.annotated_video,
    )
    print(result.table())
    written = ", ".join(str(path) for path in result.files.values())
    print(f"\ntracked in {time.perf_counter() - start:.1f} s; wrote {written}")
    return 0


def add_parsers(sub) -> None:
    """The ``track`` subcommand."""
    track = sub.add_parser(
        "track",
        help="track people in a video with SUREID embeddings (BoxMOT trackers; pip install "
        "'sureid[tracking]')",
        description="Track the people of VIDEO with a BoxMOT tracker, once per appearance "
        "model (--model, each --compare, and no re-ID) on the same detections, side by side; "
        "print what the appearance model costs per frame (1, 8, 32 boxes) and a table of "
        "the runs; write the --model run's tracks.txt (MOTChallenge format) and tracks.png.",
    )
    track.add_argument(
        "video", help="a video file OpenCV reads (e.g. .avi, .mp4), or frames: img1/%%06d.jpg"
    )
    track.add_argument(
        "--model", default="demo-sureid", help="checkpoint folder or zoo id (default demo-sureid)"
    )
    track.add_argument(
        "--compare", nargs="+", default=[], metavar="MODEL", help="more models to run beside it"
    )
    baseline = track.add_mutually_exclusive_group()
    baseline.add_argument(
        "--no-reid-baseline",
        dest="no_reid_baseline",
        action="store_true",
        default=True,
        help="also track without re-ID (the default)",
    )
    baseline.add_argument(
        "--without-no-reid-baseline",
        dest="no_reid_baseline",
        action="store_false",
        help="do not run the no-re-ID baseline",
    )
    track.add_argument(
        "--detections",
        default=None,
        help="MOTChallenge det.txt for the video (frame, id, left, top, width, height, conf, ...;"
        " scores in [0, 1]); default: OpenCV's HOG people detector",
    )
    track.add_argument(
        "--tracker", default="botsort", choices=("botsort", "strongsort", "deepocsort")
    )
    track.add_argument("--out", default="tracking-out", help="folder for tracks.txt, tracks.png")
    track.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    track.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda[:N]")
    track.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    track.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    track.add_argument(
        "--cost-repeats",
        type=int,
        default=10,
        help="timed rounds of the appearance-cost table (0: skip it)",
    )
    track.add_argument(
        "--annotated-video", action="store_true", help="also write tracks.avi (MJPG), boxes drawn"
    )
    track.set_defaults(func=_cmd_track)
