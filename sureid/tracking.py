"""People tracking in a video with SUREID embeddings as the tracker's appearance model.

A multi-object tracker links per-frame person boxes into tracks; when people cross, stop or
are hidden for a while, the appearance of each box (its re-ID embedding) is what keeps an
identity on the right person. This module runs BoxMOT's trackers (BoT-SORT, StrongSORT,
Deep OC-SORT) on a video with :class:`~sureid.encoder.SureidReIDEncoder` embeddings, and
measures what the appearance model costs:

- :func:`read_mot_detections`, :func:`read_mot_tracks`, :func:`write_mot_tracks`: the
  MOTChallenge text files (detections in, tracks out), so a run can take a benchmark's public
  detections and its tracks can be scored with the benchmark's tools;
- :class:`HogPeopleDetector`: OpenCV's HOG people detector, built into OpenCV (nothing to
  download), for a video without detections;
- :func:`track_video`: one pass over the video; each frame is decoded and detected once, and
  every appearance mode (e.g. the SUREID student, the dense student, no re-ID) runs its own
  tracker on the same boxes, side by side, so their times compare under the same load. Writes
  ``tracks.txt`` (MOT format), ``tracks.png`` (a contact sheet of the longest tracks) and
  optionally ``tracks.avi`` (the video with its tracks drawn);
- :func:`appearance_cost`: per-frame cost of the appearance model (crop + preprocess + forward)
  for 1, 8 and 32 boxes, encoders timed round-robin (``sureid.benchmark.time_round_robin``).

OpenCV and BoxMOT are optional (``pip install 'sureid[tracking]'``), imported when a function
needs them. BoxMOT is never left to build its own ReID model (it would download weights): the
trackers get SUREID embeddings with each frame's detections, an encoder as ``reid_model``, or
run without appearance.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .benchmark import format_tokens, time_round_robin
from .encoder import as_boxes, clip_to_frame
from .errors import SureidError
from .paths import check_output_folder, replace_atomically
from .permissions import give_umask_permissions

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sureid[tracking]'"
TRACKERS = ("botsort", "strongsort", "deepocsort")
MOT_COLUMNS = ("frame", "id", "left", "top", "width", "height", "conf", "x", "y", "z")
TRACKS_FILE, SHEET_FILE, VIDEO_FILE = "tracks.txt", "tracks.png", "tracks.avi"
OUTPUT_FILES = (TRACKS_FILE, SHEET_FILE, VIDEO_FILE)
PERSON_BOX = (65, 130)  # width, height of appearance_cost's boxes: a standing person, 1:2


# --------------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------------


def _import_cv2():
    try:
        import cv2
    except ImportError as err:
        raise SureidError(
            f"tracking needs OpenCV (video reading, the HOG detector): {INSTALL_HINT} "
            f"({type(err).__name__}: {err})"
        ) from err
    return cv2


def _import_boxmot():
    """BoxMOT's package with its trackers imported: their import configures BoxMOT's logger
    (level INFO, one line per tracker made), which :func:`_quiet_boxmot` then turns down to
    warnings while SUREID drives it; configured later, it would undo that."""
    try:
        import boxmot
        from boxmot import BotSort, DeepOcSort, StrongSort  # noqa: F401
        from boxmot.structures import Boxes, Detections  # noqa: F401
    except ImportError as err:
        raise SureidError(
            f"tracking needs BoxMOT (the trackers): {INSTALL_HINT} ({type(err).__name__}: {err})"
        ) from err
    return boxmot


@contextlib.contextmanager
def _quiet_boxmot() -> Iterator[None]:
    """BoxMOT's logger ("boxmot", configured at its import) at WARNING inside the block."""
    boxmot_logger = logging.getLogger("boxmot")
    level = boxmot_logger.level
    boxmot_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        boxmot_logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# MOTChallenge files
# --------------------------------------------------------------------------------------------


def _parse_mot_line(text: str, where: str) -> list[float]:
    """frame, id, left, top, width, height, conf of one line, checked; ``where`` is file:line."""
    fields = [f.strip() for f in text.split(",")]
    if len(fields) < 7:
        raise SureidError(
            f"{where}: {len(fields)} comma-separated column(s) in {text!r}; a MOTChallenge line "
            "has at least 7: frame, id, left, top, width, height, conf (det.txt adds x, y, z)"
        )
    try:
        values = [float(v) for v in fields[:7]]
    except ValueError:
        raise SureidError(
            f"{where}: not a number in {text!r}; MOTChallenge lines are comma-separated numbers: "
            "frame, id, left, top, width, height, conf[, x, y, z]"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise SureidError(f"{where}: a NaN or infinite value in {text!r}")
    if values[0] < 1 or values[0] != int(values[0]):
        raise SureidError(
            f"{where}: frame {fields[0]} is not a whole number >= 1 (MOTChallenge counts frames "
            "from 1)"
        )
    if values[4] < 0 or values[5] < 0:
        raise SureidError(
            f"{where}: negative width or height ({fields[4]}, {fields[5]}); columns 5 and 6 are "
            "the box's width and height in pixels, >= 0"
        )
    return values


def _parse_mot(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Rows [M, 7] (frame, id, left, top, width, height, conf; float64) of a MOT file and the
    line number of each; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a MOTChallenge text file, e.g. det.txt)")
    rows, lines = [], []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                rows.append(_parse_mot_line(line.strip(), f"{path}:{number}"))
                lines.append(number)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7), np.asarray(lines, dtype=np.int64)


def read_mot_detections(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """A MOTChallenge ``det.txt`` (``frame, id, left, top, width, height, conf, x, y, z``,
    frames from 1) as ``{frame: float32 [N, 5]}``: ``x1, y1, x2, y2, score`` per box, in the
    file's order; frames without boxes are absent (an empty file gives ``{}``).

    Scores must lie in [0, 1], the range the trackers' thresholds assume; a bad line raises
    naming ``file:line``.
    """
    rows, lines = _parse_mot(path)
    scores = rows[:, 6]
    bad = (scores < 0) | (scores > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SureidError(
            f"{path}:{lines[i]}: score {scores[i]:g} is outside [0, 1] (the file's scores range "
            f"from {scores.min():g} to {scores.max():g}). The trackers compare scores with "
            "thresholds in [0, 1] (BoT-SORT starts a track above 0.6): rescale the file's conf "
            "column first, e.g. (conf - min) / (max - min) over the file, or 1 / (1 + exp(-conf)) "
            "for SVM margins such as MOT17's DPM detections"
        )
    boxes = np.column_stack(
        [rows[:, 2], rows[:, 3], rows[:, 2] + rows[:, 4], rows[:, 3] + rows[:, 5], scores]
    ).astype(np.float32)
    frames = rows[:, 0].astype(np.int64)
    return {int(f): boxes[frames == f] for f in np.unique(frames)}


def read_mot_tracks(path: str | os.PathLike) -> np.ndarray:
    """A MOTChallenge tracks file (what :func:`write_mot_tracks` writes) as float64
    ``[M, 7]``: ``frame, id, x1, y1, x2, y2, score`` per row, in the file's order."""
    rows, _ = _parse_mot(path)
    x1, y1 = rows[:, 2], rows[:, 3]
    return np.column_stack(
        [rows[:, 0], rows[:, 1], x1, y1, x1 + rows[:, 4], y1 + rows[:, 5], rows[:, 6]]
    )


def _write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """``paths.replace_atomically``, then the umask's permissions for the file."""
    replace_atomically(path, write)
    give_umask_permissions((path,))
    return path


def write_mot_tracks(path: str | os.PathLike, rows) -> Path:
    """Write tracks in the MOTChallenge result format: ``frame, id, left, top, width, height,
    conf, -1, -1, -1`` per line, sorted by frame then id, atomically.

    ``rows``: ``[M, 7]`` ``frame, id, x1, y1, x2, y2, score`` (as :class:`TrackingResult`
    holds them and :func:`read_mot_tracks` returns them); frames and ids are whole numbers from
    1, as the format (and TrackEval) wants them.
    """
    path = Path(path)
    array = np.asarray(rows, dtype=np.float64)
    if array.size == 0:
        array = array.reshape(0, 7)
    if array.ndim != 2 or array.shape[1] != 7:
        raise SureidError(
            f"tracks for {path} have shape {array.shape}; pass [M, 7] rows: frame, id, x1, y1, "
            "x2, y2, score"
        )
    if not np.isfinite(array).all():
        raise SureidError(f"tracks for {path} hold NaN or infinite values")
    for column, name in ((0, "frame"), (1, "id")):
        values = array[:, column]
        if ((values < 1) | (values != np.round(values))).any():
            raise SureidError(
                f"tracks for {path}: every {name} must be a whole number >= 1 (MOTChallenge "
                "counts both from 1; add 1 to BoxMOT's 0-based track ids)"
            )
    array = array[np.lexsort((array[:, 1], array[:, 0]))]
    lines = [
        f"{int(f)},{int(i)},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{s:.4f},-1,-1,-1\n"
        for f, i, x1, y1, x2, y2, s in array.tolist()
    ]
    return _write_file(path, lambda tmp: tmp.write_text("".join(lines)))


# --------------------------------------------------------------------------------------------
# The HOG people detector
# --------------------------------------------------------------------------------------------


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(
            np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]),
            0,
            None,
        )
        h = np.clip(
            np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]),
            0,
            None,
        )
        overlap = w * h / np.maximum(areas[i] + areas[rest] - w * h, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def hog_rows(rects, margins, nms_iou: float = 0.4) -> np.ndarray:
    """HOG's ``(x, y, w, h)`` rectangles and SVM margins as float32 ``[N, 5]`` rows
    ``x1, y1, x2, y2, score`` after non-maximum suppression, best first.

    ``score = 1 / (1 + exp(-margin))``: the margin is the signed distance to the SVM's plane
    (0 on it, about 0.3 to 4 for detections on real video), the sigmoid maps it into [0, 1], the
    range the trackers' thresholds assume, keeping its order; margin 0 gives 0.5, margin 0.41
    gives 0.6 (BoT-SORT's threshold to start a track).
    """
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    margins = np.asarray(margins, dtype=np.float64).reshape(-1)
    if len(rects) != len(margins):
        raise ValueError(f"{len(rects)} rectangles but {len(margins)} margins")
    if not len(rects):
        return np.zeros((0, 5), dtype=np.float32)
    boxes = np.column_stack([rects[:, :2], rects[:, :2] + rects[:, 2:]])
    scores = 1.0 / (1.0 + np.exp(-margins))
    keep = _nms(boxes, scores, nms_iou)
    return np.column_stack([boxes[keep], scores[keep]]).astype(np.float32)


class HogPeopleDetector:
    """OpenCV's default people detector: HOG features and a linear SVM (Dalal and Triggs), the
    weights inside OpenCV, so it runs offline with nothing to download.

    ``detector(frame_bgr)`` -> float32 ``[N, 5]``: ``x1, y1, x2, y2, score`` with ``score`` in
    [0, 1] (the SVM margin through a sigmoid, see :func:`hog_rows`), after OpenCV's grouping of
    overlapping windows (``group_threshold``) and non-maximum suppression (``nms_iou``).

    The settings are attributes, read at each call: ``win_stride`` (pixels between windows),
    ``scale`` (step between pyramid levels), ``padding`` (pixels added around the image),
    ``hit_threshold`` (lowest margin kept). The window is 64x128, so people under about 100
    pixels tall are missed; upscaling the frame finds them at the square of the scale in time.
    OpenCV's own threads run it (``cv2.setNumThreads``). It is a weak detector, about 100 ms
    per 768x576 frame on 2 CPU cores, that misses small and partly hidden people and sometimes
    boxes two people as one; a real pipeline runs a trained CNN detector and passes its boxes
    to :func:`track_video` as ``detections``.
    """

    MIN_SIZE = (64, 128)  # width, height: the detection window

    def __init__(
        self,
        *,
        win_stride: int = 8,
        scale: float = 1.05,
        padding: int = 8,
        hit_threshold: float = 0.0,
        group_threshold: int = 2,
        nms_iou: float = 0.4,
    ):
        cv2 = _import_cv2()
        self.win_stride, self.scale, self.padding = win_stride, scale, padding
        self.hit_threshold = hit_threshold
        self.group_threshold = group_threshold
        self.nms_iou = nms_iou
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def __repr__(self) -> str:
        return (
            f"HOG people detector (win_stride {self.win_stride}, scale {self.scale}, "
            f"padding {self.padding})"
        )

    def __call__(self, frame_bgr: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame_bgr)
        shape_ok = frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)
        if not shape_ok or frame.dtype != np.uint8:
            raise SureidError(
                f"the HOG detector takes a uint8 HxWx3 BGR frame (as OpenCV reads video), got "
                f"shape {frame.shape} and dtype {frame.dtype}"
            )
        if frame.shape[1] < self.MIN_SIZE[0] or frame.shape[0] < self.MIN_SIZE[1]:
            return np.zeros((0, 5), dtype=np.float32)  # smaller than one window: nobody fits
        rects, margins = self._hog.detectMultiScale(
            frame,
            hitThreshold=self.hit_threshold,
            winStride=(self.win_stride, self.win_stride),
            padding=(self.padding, self.padding),
            scale=self.scale,
            groupThreshold=self.group_threshold,
        )
        return hog_rows(rects, margins, self.nms_iou)


# --------------------------------------------------------------------------------------------
# Trackers
# --------------------------------------------------------------------------------------------


def make_tracker(
    name: str = "botsort",
    *,
    reid: bool = True,
    frame_rate: float = 30.0,
    reid_model: Any = None,
    **kwargs,
):
    """A BoxMOT tracker with its defaults: ``"botsort"``, ``"strongsort"`` or ``"deepocsort"``.

    ``reid=True``: it matches by appearance too; feed it ``Detections`` with ``embeddings``
    (what :func:`track_video` does), or pass ``reid_model`` (an object with
    ``get_features(boxes, bgr_image)``, e.g. a :class:`~sureid.encoder.SureidReIDEncoder`) and
    plain ``[N, 6]`` detections. Never leave both out: BoxMOT would then download a ReID model
    of its own. ``reid=False``: motion and overlap only (``use_embeddings=False``); StrongSORT
    has no such switch (it always takes embeddings), so feed it constant ones
    (:func:`tracker_label` says so). BoT-SORT gets ``frame_rate`` (the video's), which scales its
    lost-track buffer (30 frames at 30 fps, i.e. one second); ``kwargs`` go to the tracker.
    """
    boxmot = _import_boxmot()
    if name not in TRACKERS:
        raise SureidError(f"tracker {name!r} is not one of {', '.join(TRACKERS)}")
    if reid_model is not None:
        if not reid:
            raise SureidError("reid_model was given with reid=False; drop one of them")
        kwargs["reid_model"] = reid_model
    with _quiet_boxmot():
        if name == "botsort":
            kwargs.setdefault("frame_rate", max(1, round(frame_rate)))
            return boxmot.BotSort(use_embeddings=reid, **kwargs)
        if name == "deepocsort":
            return boxmot.DeepOcSort(use_embeddings=reid, **kwargs)
        return boxmot.StrongSort(**kwargs)


def tracker_label(name: str, reid: bool) -> str:
    """What a mode's tracker ran, for the tables: the tracker, and how it ran without re-ID."""
    if reid:
        return name
    if name == "strongsort":
        return "strongsort, constant embeddings (motion + IoU only)"
    return f"{name}, use_embeddings=False"


# --------------------------------------------------------------------------------------------
# Videos and boxes
# --------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What OpenCV reports of a video: frames (0 when it cannot tell), fps, width, height."""

    path: str
    frames: int
    fps: float
    width: int
    height: int


def _open_video(video: str | os.PathLike):
    """An opened ``cv2.VideoCapture`` and the video's :class:`VideoInfo`."""
    cv2 = _import_cv2()
    path = Path(video)
    if not path.is_file() and "%" not in path.name:  # "%" : an image sequence, img1/%06d.jpg
        raise FileNotFoundError(
            f"{path}: no such video file (for a folder of frames, pass a pattern such as "
            "img1/%06d.jpg)"
        )
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SureidError(
            f"OpenCV cannot read {path} as a video; convert it to a format OpenCV reads, e.g. "
            f"ffmpeg -i {path} -c:v mjpeg -q:v 3 video.avi"
        )
    fps = capture.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(
        path=str(path),
        frames=max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))),
        fps=float(fps) if fps and math.isfinite(fps) and fps > 0 else 30.0,
        width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    return capture, info


def read_frame(video: str | os.PathLike, index: int = 0) -> np.ndarray:
    """Frame ``index`` (0-based) of ``video`` as OpenCV reads it: uint8 HxWx3 BGR."""
    capture, _ = _open_video(video)
    try:
        for i in range(index + 1):
            ok, frame = capture.read()
            if not ok:
                raise SureidError(f"{video} has no frame {index} (it ended after {i} frames)")
    finally:
        capture.release()
    return frame


def boxes_with_area(rows: np.ndarray, width: int, height: int) -> np.ndarray:
    """The rows (``[N, >=4]``, ``x1, y1, x2, y2`` first) whose box keeps an area once clipped
    to the ``width`` x ``height`` frame: a box with none has no pixels to embed, and BoxMOT
    refuses zero-size boxes."""
    rows = np.asarray(rows, dtype=np.float32)
    return rows[clip_to_frame(rows[:, :4], width, height)[1]]


def person_boxes(frame_shape: Sequence[int], count: int) -> np.ndarray:
    """``count`` person-shaped boxes (``x1, y1, x2, y2``; 130x65 pixels, height twice the
    width, or smaller to fit a small frame) tiled over a frame of ``frame_shape`` (H, W, ...)
    row by row; past a full tiling the grid starts again shifted by half a box."""
    height, width = int(frame_shape[0]), int(frame_shape[1])
    box_h = min(PERSON_BOX[1], height, 2 * width)
    box_w = max(1, box_h // 2)
    cols, rows = max(1, width // box_w), max(1, height // box_h)
    boxes = []
    for i in range(count):
        cell, layer = i % (cols * rows), i // (cols * rows)
        shift = (layer % 2) * 0.5
        x = min(((cell % cols) + shift) * box_w, width - box_w)
        y = min(((cell // cols) + shift) * box_h, height - box_h)
        boxes.append([x, y, x + box_w, y + box_h])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


# --------------------------------------------------------------------------------------------
# The tracking run
# --------------------------------------------------------------------------------------------


@dataclass
class ModeRun:
    """One appearance mode of a run: its tracker, per-frame times (ms) and the ids it gave."""

    name: str
    encoder: Any  # a SureidReIDEncoder, or None: no re-ID
    tracker_label: str
    tracker: Any = field(repr=False, default=None)
    appearance_ms: list[float] = field(default_factory=list)
    tracker_ms: list[float] = field(default_factory=list)
    tracked_boxes: list[int] = field(default_factory=list)
    track_frames: Counter = field(default_factory=Counter)  # id (1-based) -> frames it is in
    rows: list[list[float]] = field(default_factory=list)  # frame, id, x1, y1, x2, y2, score

    @property
    def constant_embeddings(self) -> bool:
        """StrongSORT without re-ID: fed constant embeddings (it has no use_embeddings)."""
        return self.encoder is None and self.tracker_label.startswith("strongsort")


@dataclass
class TrackingResult:
    """What :func:`track_video` measured and found.

    ``tracks``: float64 ``[M, 7]`` ``frame, id, x1, y1, x2, y2, score`` of the written (first)
    mode, frames and ids from 1 as in ``tracks.txt``; ``modes``: every mode's :class:`ModeRun`
    (times in ms per frame); ``decode_ms`` / ``detect_ms`` / ``boxes``: per frame, shared by the
    modes; ``files``: what was written, by name.
    """

    video: VideoInfo
    detector: str
    written_mode: str
    tracks: np.ndarray
    modes: dict[str, ModeRun]
    decode_ms: list[float]
    detect_ms: list[float]
    boxes: list[int]
    dropped_boxes: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return len(self.decode_ms)

    def end_to_end_fps(self, mode: str) -> float:
        """Frames per second of decode + detect + ``mode``'s appearance + tracker (means)."""
        run = self.modes[mode]
        total = sum(map(_mean, (self.decode_ms, self.detect_ms, run.appearance_ms, run.tracker_ms)))
        return 1000.0 / total if total > 0 else float("inf")

    def table(self) -> str:
        """The run as markdown: a line on the video and shared steps, then a row per mode."""
        info = self.video
        head = (
            f"{Path(info.path).name}: {self.frames} frames, {info.width}x{info.height} at "
            f"{info.fps:g} fps; detections: {self.detector}; decode {_mean(self.decode_ms):.1f} "
            f"ms/frame, detect {_mean(self.detect_ms):.1f} ms/frame; "
            f"{_mean(self.boxes):.2f} boxes/frame to the trackers"
        )
        if self.dropped_boxes:
            head += f" ({self.dropped_boxes} boxes with no area in the frame dropped)"
        columns = (
            "mode", "tracker", "appearance ms/frame", "tracker ms/frame", "end-to-end frames/s",
            "boxes/frame (in / tracked)", "tracks", "mean track length (frames)",
        )  # fmt: skip
        lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for name, run in self.modes.items():
            lengths = list(run.track_frames.values())
            cells = [
                name + (" (written)" if name == self.written_mode else ""),
                run.tracker_label,
                f"{_mean(run.appearance_ms):.1f}",
                f"{_mean(run.tracker_ms):.1f}",
                f"{self.end_to_end_fps(name):.2f}",
                f"{_mean(self.boxes):.2f} / {_mean(run.tracked_boxes):.2f}",
                str(len(lengths)),
                f"{_mean(lengths):.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if len(values) else 0.0


def _detections(boxes: np.ndarray, scores: np.ndarray, embeddings, index: int):
    """One frame's BoxMOT ``Detections`` (class 0, person), with embeddings when given."""
    from boxmot.structures import Boxes, Detections

    return Detections(
        geometry=Boxes(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))),
        scores=torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
        class_ids=torch.zeros(len(boxes), dtype=torch.int64),
        sample_id=f"frame-{index}",
        embeddings=None if embeddings is None else torch.from_numpy(embeddings),
    )


def _embeddings(run: ModeRun, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray | None:
    """The mode's appearance of ``boxes``: SUREID embeddings, constant ones (StrongSORT without
    re-ID), or None."""
    if run.encoder is not None:
        return np.ascontiguousarray(run.encoder.encode(frame, boxes, color="bgr"), np.float32)
    if run.constant_embeddings:
        return np.ones((len(boxes), 1), dtype=np.float32)
    return None


def _track_frame(run: ModeRun, frame: np.ndarray, dets: np.ndarray, index: int) -> None:
    """One mode on one frame: appearance, then the tracker's update, each timed; the tracks
    are recorded with frame and id from 1."""
    start = time.perf_counter()
    embeddings = _embeddings(run, frame, dets[:, :4])
    middle = time.perf_counter()
    tracks = run.tracker.update(_detections(dets[:, :4], dets[:, 4], embeddings, index), frame)
    end = time.perf_counter()
    run.appearance_ms.append((middle - start) * 1000.0)
    run.tracker_ms.append((end - middle) * 1000.0)
    ids = tracks.track_ids.numpy() + 1
    run.tracked_boxes.append(len(ids))
    run.track_frames.update(ids.tolist())
    boxes, scores = tracks.geometry.values.numpy(), tracks.scores.numpy()
    for track_id, box, score in zip(ids.tolist(), boxes.tolist(), scores.tolist()):
        run.rows.append([index + 1, track_id, *box, score])


def check_rows(rows, what: str) -> np.ndarray:
    """One frame's detections as float32 ``[N, 5]`` (``x1, y1, x2, y2, score``), checked as the
    trackers need them: the shape, scores in [0, 1], finite corners with ``x2 >= x1`` and
    ``y2 >= y1`` (``sureid.encoder.as_boxes``); ``what`` names the frame and the source."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.size == 0:
        return np.zeros((0, 5), dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != 5:
        raise SureidError(
            f"{what}: detections of shape {rows.shape}; pass [N, 5] rows: x1, y1, x2, y2, score "
            "(score in [0, 1])"
        )
    if not np.isfinite(rows[:, 4]).all() or ((rows[:, 4] < 0) | (rows[:, 4] > 1)).any():
        raise SureidError(
            f"{what}: scores outside [0, 1] ({rows[:, 4].min():g} to {rows[:, 4].max():g}); the "
            "trackers' thresholds assume [0, 1]: map them there (e.g. a sigmoid of an SVM margin)"
        )
    as_boxes(rows[:, :4], what)  # NaN or inverted corners raise, naming the box
    return rows


@dataclass
class _Source:
    """Where a frame's boxes come from: a detector called on it, or a table of rows by frame
    (a MOT file's, or given), every frame's rows checked by :func:`check_rows`."""

    detector: Callable[[np.ndarray], np.ndarray] | None
    table: Mapping[int, np.ndarray] | None
    label: str

    def __call__(self, frame: np.ndarray, index: int) -> np.ndarray:
        if self.table is not None:
            found = self.table.get(index + 1)
            if found is None:
                return np.zeros((0, 5), dtype=np.float32)
            return check_rows(found, f"frame {index + 1} of the detections ({self.label})")
        return check_rows(self.detector(frame), f"the detector's boxes for frame {index + 1}")

    def frames_after(self, last: int) -> list[int]:
        """The table's frames past ``last`` (the video's last frame): boxes never used."""
        return sorted(f for f in self.table if f > last) if self.table is not None else []


def _check_frame_keys(table: Mapping) -> None:
    bad = [k for k in table if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1]
    if bad:
        raise SureidError(
            f"detections are keyed by frame number, counted from 1 as in MOTChallenge files; got "
            f"key {bad[0]!r}: pass {{1: rows of the first frame, 2: ...}}"
        )


def _detection_source(detections, detector) -> _Source:
    if detections is None:
        detector = detector or HogPeopleDetector()
        return _Source(detector, None, repr(detector))
    if isinstance(detections, Mapping):
        _check_frame_keys(detections)
        return _Source(None, detections, "given per frame")
    return _Source(None, read_mot_detections(detections), f"{Path(detections).name} (MOT file)")


NO_REID = "no re-ID"


def mode_names(models: Sequence[str]) -> list[str]:
    """A table name per model (checkpoint folder, zoo or hub id): a folder's own name, or the
    id; a name seen before (two folders called ``student``), or "no re-ID", gets its position
    added, so no mode replaces another in :func:`track_video`'s mapping."""
    names: list[str] = []
    for model in models:
        name = Path(model).name if Path(model).is_dir() else str(model)
        if name in names or name == NO_REID:
            name = f"{name} ({len(names) + 1})"
        names.append(name)
    return names


def _make_runs(appearance: Mapping[str, Any], tracker: str, fps: float, kwargs) -> list[ModeRun]:
    if not appearance:
        raise SureidError(
            "appearance is empty; map at least one mode name to a SureidReIDEncoder (or to "
            "None: no re-ID)"
        )
    runs = []
    for name, encoder in appearance.items():
        usable = callable(getattr(encoder, "encode", None)) and not isinstance(encoder, str)
        if encoder is not None and not usable:
            raise SureidError(
                f"appearance[{name!r}] is a {type(encoder).__name__}; pass a SureidReIDEncoder "
                f"(SureidReIDEncoder.from_pretrained({encoder!r}) for a checkpoint) or None for "
                "no re-ID"
            )
        reid = encoder is not None
        options = dict(kwargs or {})
        rate = options.pop("frame_rate", fps)  # the caller's frame_rate wins over the video's
        made = make_tracker(tracker, reid=reid, frame_rate=rate, **options)
        runs.append(ModeRun(name, encoder, tracker_label(tracker, reid), made))
    return runs


def _progress(total: int | None, show: bool, modes: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total or None, unit="frame", desc=f"tracking ({modes} modes)", disable=not show
    )


def track_video(
    video: str | os.PathLike,
    appearance: Mapping[str, Any],
    *,
    detections: str | os.PathLike | Mapping[int, np.ndarray] | None = None,
    tracker: str = "botsort",
    max_frames: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    detector: Callable[[np.ndarray], np.ndarray] | None = None,
    annotated_video: bool = False,
    tracker_kwargs: Mapping[str, Any] | None = None,
    sheet_tracks: int = 12,
    sheet_crops: int = 8,
) -> TrackingResult:
    """Track the people of ``video`` once per appearance mode, the modes side by side.

    ``appearance`` maps a mode's name to a :class:`~sureid.encoder.SureidReIDEncoder` or None
    (no re-ID), e.g. ``{"sureid": enc, "dense": enc_dense, "no re-ID": None}``; the first mode's
    tracks are the ones returned and written. Each frame is decoded and its boxes found once:
    by ``detector`` (default :class:`HogPeopleDetector`) or from ``detections`` (a MOTChallenge
    ``det.txt`` path, or ``{frame from 1: [N, 5] x1, y1, x2, y2, score}``); boxes with no area
    in the frame are dropped. Then every mode embeds them (timed: the encoder's crop,
    preprocess and forward) and updates its own ``tracker`` (one of :data:`TRACKERS`, timed),
    the order of the modes turned by one each frame so none always runs first.
    ``max_frames``: stop after so many frames.

    ``out_dir`` (checked before the run, created if missing): ``tracks.txt``, ``tracks.png``
    (the ``sheet_tracks`` longest tracks, ``sheet_crops`` crops each) and, with
    ``annotated_video``, ``tracks.avi``; they are drawn in a second pass over the video, after
    the timed one.
    """
    if max_frames is not None and max_frames < 1:
        raise SureidError(f"max_frames must be >= 1, got {max_frames}")
    source = _detection_source(detections, detector)
    capture, info = _open_video(video)
    try:
        out = _prepare_out_dir(out_dir) if out_dir is not None else None
        runs = _make_runs(appearance, tracker, info.fps, tracker_kwargs)
        result = _run(capture, info, source, runs, max_frames, progress)
    finally:
        capture.release()
    if out is not None:
        result.files = write_outputs(
            result, out, annotated_video=annotated_video, tracks=sheet_tracks, crops=sheet_crops
        )
    return result


def _run(capture, info: VideoInfo, source: _Source, runs: list[ModeRun], max_frames, progress):
    """The timed pass: decode, detect, then every mode on the frame's boxes."""
    limit = info.frames or max_frames  # for the progress bar: 0 frames means OpenCV cannot tell
    if info.frames and max_frames:
        limit = min(info.frames, max_frames)
    decode_ms, detect_ms, boxes, dropped = [], [], [], 0
    bar = _progress(limit, progress, len(runs))
    index = 0
    with bar, _quiet_boxmot():
        while max_frames is None or index < max_frames:
            start = time.perf_counter()
            ok, frame = capture.read()
            decoded = time.perf_counter()
            if not ok:
                break
            found = source(frame, index)
            detected = time.perf_counter()
            dets = boxes_with_area(found, frame.shape[1], frame.shape[0])
            dropped += len(found) - len(dets)
            shift = index % len(runs)
            for run in runs[shift:] + runs[:shift]:
                _track_frame(run, frame, dets, index)
            decode_ms.append((decoded - start) * 1000.0)
            detect_ms.append((detected - decoded) * 1000.0)
            boxes.append(len(dets))
            index += 1
            bar.update(1)
    if not index:
        raise SureidError(f"{info.path}: OpenCV read no frame from it; is the file complete?")
    _warn_unused(source, index, max_frames)
    tracks = np.asarray(runs[0].rows, dtype=np.float64).reshape(-1, 7)
    modes = {run.name: run for run in runs}
    return TrackingResult(
        info, source.label, runs[0].name, tracks, modes, decode_ms, detect_ms, boxes, dropped
    )


def _warn_unused(source: _Source, frames: int, max_frames: int | None) -> None:
    """Say so when the video ended before detections did (a det.txt of another sequence?)."""
    if max_frames is not None and frames >= max_frames:
        return  # stopped on purpose
    unused = source.frames_after(frames)
    if unused:
        logger.warning(
            "the video ended after %d frames, but the detections (%s) go on: %d frame(s) of "
            "boxes, %d to %d, were not used; do they belong to this video?",
            frames, source.label, len(unused), unused[0], unused[-1],
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Outputs: tracks.txt, the contact sheet, the annotated video
# --------------------------------------------------------------------------------------------


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` checked writable (its output files too), then created, before any work, so a
    bad folder fails at once rather than after the whole video (``sureid.paths``, as the
    commands check ``--out``)."""
    path = Path(out_dir)
    check_output_folder(path, "out_dir", files=OUTPUT_FILES)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sheet_picks(
    tracks: np.ndarray, count: int = 12, per_track: int = 8
) -> list[tuple[int, np.ndarray]]:
    """The contact sheet's content: the ``count`` longest tracks (most frames; ties: lower id)
    as ``(id, rows)``, ``rows`` up to ``per_track`` of the track's rows (``frame, id, x1, y1,
    x2, y2, score``) evenly spaced from its first frame to its last."""
    lengths = Counter(tracks[:, 1].astype(np.int64).tolist())
    longest = sorted(lengths, key=lambda i: (-lengths[i], i))[:count]
    picks = []
    for track_id in longest:
        rows = tracks[tracks[:, 1] == track_id]
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        at = np.unique(np.linspace(0, len(rows) - 1, min(per_track, len(rows))).round().astype(int))
        picks.append((track_id, rows[at]))
    return picks


def _id_color(track_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per id (golden-ratio hue steps), as an RGB tuple."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((track_id * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _crop_cell(frame_bgr: np.ndarray, box, size: tuple[int, int]):
    """The box's pixels as an RGB PIL image fitted into ``size`` (w, h) on grey, aspect kept."""
    from PIL import Image

    from .encoder import crop_boxes

    cell = Image.new("RGB", size, (96, 96, 96))
    crop = crop_boxes(frame_bgr[..., ::-1], np.asarray([box[:4]]))[0]
    if crop is None:
        return cell
    image = Image.fromarray(crop)
    ratio = min(size[0] / image.width, size[1] / image.height)
    image = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))))
    cell.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return cell


def _draw_sheet(picks, crops: dict, per_track: int, path: Path) -> Path:
    """The contact sheet: a row per track (label, then its crops, each with its frame)."""
    from PIL import Image, ImageDraw

    cell_w, cell_h, label_w, caption = 64, 128, 96, 14
    width = label_w + per_track * (cell_w + 4)
    sheet = Image.new("RGB", (width, max(1, len(picks)) * (cell_h + caption + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    if not picks:
        draw.text((8, 8), "no tracks", fill="black")
    for r, (track_id, rows) in enumerate(picks):
        top = r * (cell_h + caption + 6) + 3
        first, last = int(rows[0, 0]), int(rows[-1, 0])
        draw.rectangle((2, top, 10, top + cell_h), fill=_id_color(track_id))
        label = f"id {track_id}\nframes\n{first}-{last}"
        draw.multiline_text((16, top + 4), label, fill="black")
        for c, row in enumerate(rows):
            left = label_w + c * (cell_w + 4)
            blank = Image.new("RGB", (cell_w, cell_h), (96, 96, 96))  # the frame was not re-read
            sheet.paste(crops.get((track_id, int(row[0])), blank), (left, top))
            draw.text((left + 2, top + cell_h + 1), f"f{int(row[0])}", fill="black")
    return _write_file(path, lambda tmp: sheet.save(tmp))


def _annotate(frame: np.ndarray, rows: np.ndarray, frame_number: int) -> np.ndarray:
    """A copy of the BGR frame with each track's box and id drawn in the id's colour."""
    cv2 = _import_cv2()
    out = frame.copy()
    for _, track_id, x1, y1, x2, y2, _ in rows.tolist():
        r, g, b = _id_color(int(track_id))
        cv2.rectangle(out, (round(x1), round(y1)), (round(x2), round(y2)), (b, g, r), 2)
        cv2.putText(out, str(int(track_id)), (round(x1), max(12, round(y1) - 4)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (b, g, r), 2)  # fmt: skip
    cv2.putText(
        out, f"frame {frame_number}", (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2
    )
    return out


def _open_writer(path: Path, info: VideoInfo):
    cv2 = _import_cv2()
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"MJPG"), info.fps, (info.width, info.height)
    )
    if not writer.isOpened():
        raise SureidError(f"OpenCV cannot write an MJPG video to {path}")
    return writer


def _second_pass(result: TrackingResult, picks, tmp_video: Path | None) -> dict:
    """Read the tracked frames again: cut the contact sheet's crops, and write the annotated
    video to ``tmp_video`` when given. Returns the crops by (id, frame)."""
    wanted = defaultdict(list)
    for track_id, rows in picks:
        for row in rows:
            wanted[int(row[0])].append((track_id, row))
    by_frame = defaultdict(list)
    for row in result.tracks:
        by_frame[int(row[0])].append(row)
    last = result.frames if tmp_video is not None else max(wanted, default=0)
    capture, info = _open_video(result.video.path)
    writer = _open_writer(tmp_video, info) if tmp_video is not None else None
    crops = {}
    try:
        for number in range(1, last + 1):
            ok, frame = capture.read()
            if not ok:
                break
            for track_id, row in wanted.get(number, ()):
                crops[(track_id, number)] = _crop_cell(frame, row[2:6], (64, 128))
            if writer is not None:
                rows = np.asarray(by_frame.get(number, []), dtype=np.float64).reshape(-1, 7)
                writer.write(_annotate(frame, rows, number))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    return crops


def write_outputs(
    result: TrackingResult,
    out_dir: str | os.PathLike,
    *,
    annotated_video: bool = False,
    tracks: int = 12,
    crops: int = 8,
) -> dict[str, Path]:
    """Write ``result``'s ``tracks.txt``, ``tracks.png`` and (``annotated_video``)
    ``tracks.avi`` into ``out_dir``, each atomically. Returns the paths by file name."""
    out = _prepare_out_dir(out_dir)
    files = {TRACKS_FILE: write_mot_tracks(out / TRACKS_FILE, result.tracks)}
    picks = sheet_picks(result.tracks, tracks, crops)
    cut: dict = {}
    if annotated_video:  # the crops are cut in the pass that writes the video

        def write_video(tmp: Path) -> None:
            cut.update(_second_pass(result, picks, tmp))

        files[VIDEO_FILE] = _write_file(out / VIDEO_FILE, write_video)
    else:
        cut = _second_pass(result, picks, None)
    files[SHEET_FILE] = _draw_sheet(picks, cut, crops, out / SHEET_FILE)
    return files


# --------------------------------------------------------------------------------------------
# The appearance model's cost per frame
# --------------------------------------------------------------------------------------------


@dataclass
class AppearanceCostRow:
    """One encoder (or no re-ID) in :class:`AppearanceCost`: by box count, the median ms per
    frame over rounds, its range, and the median per-round speed-up over the baseline."""

    name: str
    tokens: str
    ms: dict[int, float]
    ms_range: dict[int, tuple[float, float]]
    speedup: dict[int, float] | None  # None: no re-ID (nothing runs)


@dataclass
class AppearanceCost:
    """Per-frame appearance cost (crop + preprocess + forward) at several box counts."""

    rows: list[AppearanceCostRow]
    baseline: str
    box_counts: tuple[int, ...]
    frame_size: tuple[int, int]  # width, height
    rounds: str
    device: str

    def table(self) -> str:
        """Markdown: a line on the setting, then a row per encoder."""
        counts = self.box_counts
        width, height = self.frame_size
        head = (
            f"appearance per frame: crop + preprocess + forward of N person boxes "
            f"({PERSON_BOX[0]}x{PERSON_BOX[1]} px, w x h) in a {width}x{height} frame; "
            f"{self.device}; {self.rounds}"
        )
        columns = ["model", "image tokens"] + [f"ms/frame, {n} box{'es' * (n > 1)}" for n in counts]
        columns.append(f"speed-up vs {self.baseline} ({' / '.join(map(str, counts))} boxes)")
        lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            cells = [row.name, row.tokens]
            for n in counts:
                low, high = row.ms_range[n]
                cells.append(
                    "0" if row.speedup is None else f"{row.ms[n]:.1f} ({low:.1f}-{high:.1f})"
                )
            if row.speedup is None:
                cells.append("n/a (nothing runs)")
            else:
                cells.append(" / ".join(f"{row.speedup[n]:.2f}x" for n in counts))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _encoder_tokens(encoder) -> str:
    model = getattr(encoder, "model", None)
    config = getattr(model, "config", None)
    return format_tokens(config) if config is not None else "?"


def _device_line(encoders: Sequence[Any]) -> str:
    devices = {str(getattr(e, "device", "cpu")) for e in encoders}
    line = ", ".join(sorted(devices))
    if "cpu" in devices:
        line += f" ({torch.get_num_threads()} torch threads)"
    return line


def appearance_cost(
    encoders: Mapping[str, Any],
    frame: np.ndarray,
    box_counts: Sequence[int] = (1, 8, 32),
    *,
    repeats: int = 10,
    warmup: int = 2,
    baseline: str | None = None,
    color: str = "bgr",
) -> AppearanceCost:
    """What each encoder costs a tracker per frame: ``encode(frame, boxes)`` (crop, preprocess,
    forward) for each count of person-shaped boxes (:func:`person_boxes`) tiled over ``frame``.

    ``encoders``: name -> :class:`~sureid.encoder.SureidReIDEncoder`, or None for the no-re-ID
    row (0 ms). Every (encoder, count) pair is one entry of
    :func:`~sureid.benchmark.time_round_robin` (``warmup`` + ``repeats`` rounds, the order
    turned each round, a small count called several times per turn to rise above timer noise);
    a row's speed-up is the median over rounds of baseline time / its time (``baseline``: an
    encoder's name, default the first).
    """
    counts = tuple(int(n) for n in box_counts)
    if not counts or min(counts) < 1:
        raise SureidError(f"box_counts must be counts >= 1, got {box_counts}")
    real = {name: enc for name, enc in encoders.items() if enc is not None}
    if not real:
        raise SureidError("appearance_cost needs at least one encoder (not only None)")
    baseline = next(iter(real)) if baseline is None else baseline
    if baseline not in real:
        raise SureidError(f"baseline {baseline!r} is not one of the encoders: {', '.join(real)}")
    boxes = person_boxes(frame.shape, max(counts))
    calls, per_round = {}, {}
    for name, encoder in real.items():
        for n in counts:
            key = f"{name} @ {n}"
            calls[key] = lambda e=encoder, b=boxes[:n]: e.encode(frame, b, color=color)
            per_round[key] = max(1, max(counts) // n)
    wall, _ = time_round_robin(calls, repeats, warmup, calls_per_round=per_round)
    rows = [_cost_row(name, encoders[name], wall, counts, baseline) for name in encoders]
    rounds = f"{warmup} warm-up + {repeats} timed rounds, round-robin"
    size = (frame.shape[1], frame.shape[0])
    return AppearanceCost(rows, baseline, counts, size, rounds, _device_line(list(real.values())))


def _cost_row(name: str, encoder, wall: Mapping[str, list[float]], counts, baseline: str):
    if encoder is None:
        zero = dict.fromkeys(counts, 0.0)
        return AppearanceCostRow(name, "-", zero, dict.fromkeys(counts, (0.0, 0.0)), None)
    ms, ranges, speedup = {}, {}, {}
    for n in counts:
        times, base = wall[f"{name} @ {n}"], wall[f"{baseline} @ {n}"]
        ms[n], ranges[n] = statistics.median(times), (min(times), max(times))
        speedup[n] = statistics.median(b / t for b, t in zip(base, times))
    return AppearanceCostRow(name, _encoder_tokens(encoder), ms, ranges, speedup)


__all__ = [
    "AppearanceCost",
    "AppearanceCostRow",
    "HogPeopleDetector",
    "ModeRun",
    "TRACKERS",
    "TrackingResult",
    "VideoInfo",
    "appearance_cost",
    "boxes_with_area",
    "hog_rows",
    "make_tracker",
    "mode_names",
    "check_rows",
    "person_boxes",
    "read_frame",
    "read_mot_detections",
    "read_mot_tracks",
    "tracker_label",
    "track_video",
    "write_mot_tracks",
    "write_outputs",
]
