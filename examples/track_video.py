"""Track the people of a video with SUREID embeddings, beside a dense student and no re-ID.

    python examples/track_video.py vtest.avi
    python examples/track_video.py vtest.avi --model runs/student --compare runs/dense --out out/

Every frame is decoded and its people found once (OpenCV's HOG people detector, or the boxes
of a MOTChallenge ``--detections det.txt``); then each appearance model (``--model``, each
``--compare``, and no re-ID) runs its own BoxMOT tracker (BoT-SORT by default) on the same
boxes, side by side. The script prints what the appearance model costs per frame (1, 8 and 32
boxes, timed round-robin), then the run: appearance and tracker ms per frame, end-to-end
frames/s, boxes and tracks per mode. ``--out`` gets the ``--model`` run's ``tracks.txt``
(MOTChallenge format) and ``tracks.png`` (the longest tracks, eight crops each).
``sureid track`` does the same from the command line.

Needs ``pip install 'sureid[tracking]'`` (BoxMOT, OpenCV). The default models are the
checkpoints ``sureid demo`` trains (``demo-sureid``, ``demo-dense``); pass checkpoint folders
otherwise. A real test video, the 795-frame 768x576 street scene of OpenCV's samples, comes
in Debian's opencv-doc package::

    apt-get download opencv-doc
    dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x --wildcards '*vtest.avi' -O > vtest.avi
"""

from __future__ import annotations

import argparse
import time

import torch

from sureid.encoder import SureidReIDEncoder
from sureid.tracking import NO_REID, TRACKERS, appearance_cost, mode_names, read_frame, track_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video", help="a video file OpenCV reads (.avi, .mp4, ...)")
    parser.add_argument("--model", default="demo-sureid", help="checkpoint folder or zoo id")
    parser.add_argument("--compare", nargs="*", default=["demo-dense"], help="models beside it")
    parser.add_argument("--detections", default=None, help="MOTChallenge det.txt (default: HOG)")
    parser.add_argument("--tracker", default="botsort", choices=TRACKERS)
    parser.add_argument("--out", default="tracking-out", help="folder for tracks.txt, tracks.png")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # The tracked modes, by a short name: the model (its tracks are written), each
    # comparison, and no re-ID (None).
    models = [args.model, *args.compare]
    names = mode_names(models)  # folder names; two folders of one name stay two modes
    encoders = {
        name: SureidReIDEncoder.from_pretrained(model, device=args.device)
        for name, model in zip(names, models)
    }
    encoders[NO_REID] = None

    # What the appearance model costs per frame, against the first comparison (the dense one).
    baseline = names[1] if args.compare else names[0]
    cost = appearance_cost(encoders, read_frame(args.video), baseline=baseline)
    print(cost.table() + "\n", flush=True)

    start = time.perf_counter()
    result = track_video(
        args.video,
        encoders,
        detections=args.detections,
        tracker=args.tracker,
        max_frames=args.max_frames,
        out_dir=args.out,
    )
    print(result.table())
    seconds = time.perf_counter() - start
    print(f"\ntracked in {seconds:.1f} s; wrote {', '.join(map(str, result.files.values()))}")


if __name__ == "__main__":
    main()
