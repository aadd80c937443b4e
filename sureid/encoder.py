"""Embeddings for person boxes in video frames: the appearance model of a tracker.

:class:`SureidReIDEncoder` takes a whole frame (a numpy ``HxWx3`` uint8 array in RGB or BGR
order, as the caller says, or a PIL image) and N person boxes (``xyxy`` pixels), cuts the boxes
out, and returns N L2-normalised float32 embeddings. The crops go through the model's
:class:`~sureid.SureidImageProcessor`, the code path ``extract_features`` uses, so a box's
embedding equals ``extract_features`` of the same crop saved as a lossless image.

Boxes, as a tracker's detector gives them:

- a box partly outside the frame is clipped to the frame;
- its pixels are the ones it touches: ``floor(x1):ceil(x2)`` by ``floor(y1):ceil(y2)``;
- a box with no area left after clipping (entirely outside, or zero width or height) has no
  appearance: its row is all zeros (cosine similarity 0 to every embedding, never NaN) with
  ``on_empty="zeros"`` (the default), or it raises with ``on_empty="raise"``;
- NaN / infinite coordinates, or ``x2 < x1`` / ``y2 < y1`` (``xywh`` boxes passed as ``xyxy``?)
  raise, naming the box.

Several frames (cameras) go through one batched forward (:meth:`SureidReIDEncoder.encode_frames`),
cut into chunks of ``batch_size`` crops to bound memory. :meth:`SureidReIDEncoder.get_features`
is BoxMOT's appearance-backend protocol (``get_features(boxes, bgr_image)``), so the encoder plugs
into BoxMOT's trackers as ``reid_model``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import SureidError
from .image_processing_sureid import SureidImageProcessor
from .image_processing_sureid import logger as processing_logger
from .inference import load_model, precision, resolve_autocast_dtype, resolve_device

logger = logging.getLogger(__name__)

COLORS = ("rgb", "bgr")
ON_EMPTY = ("zeros", "raise")


class SureidReIDEncoder:
    """A SUREID model as a box encoder for trackers and other apps.

    ``model``: a SUREID teacher / student, or a checkpoint folder / zoo id
    (``SureidModel.from_pretrained``). It is put in eval mode (the student really drops tokens)
    on ``device`` ("auto": CUDA if available, else the CPU), and runs under
    ``torch.inference_mode`` with autocast in ``dtype`` on a GPU (None: bf16 where supported,
    else fp16; float32 on the CPU), SUREID's one device / precision policy (``extract_features``
    and ``sureid extract --dtype`` follow it too). At most ``batch_size`` crops go through the
    model at once.
    """

    def __init__(
        self,
        model,
        *,
        device: str | torch.device = "auto",
        dtype: torch.dtype | str | None = None,
        batch_size: int = 64,
        on_empty: str = "zeros",
        processor: SureidImageProcessor | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty must be one of {ON_EMPTY}, got {on_empty!r}")
        self.model = load_model(model)
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_autocast_dtype(self.device, dtype)
        self.batch_size = batch_size
        self.on_empty = on_empty
        self.processor = processor or SureidImageProcessor.from_model_config(self.model.config)
        self.model.to(self.device).eval()
        self.empty_boxes = 0  # zero-feature rows returned so far (on_empty="zeros")
        # the processor's warning about crops far smaller than the model's input: said once per
        # encoder, not once per frame of a video
        self._small_crop_warning = _FirstWarningOnly(processing_logger)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> SureidReIDEncoder:
        """The encoder of a checkpoint folder or zoo id (``demo-sureid``, a hub id, ...)."""
        return cls(name_or_path, **kwargs)

    @property
    def embedding_dim(self) -> int:
        """The length of one embedding (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def __call__(self, frame, boxes, **kwargs):
        return self.encode(frame, boxes, **kwargs)

    def encode(self, frame, boxes, *, color: str = "rgb", return_tensors: str = "np"):
        """Embeddings of ``boxes`` (``[N, 4]`` xyxy pixels, numpy / torch / list) in ``frame``.

        ``frame``: numpy ``HxWx3`` uint8 in ``color`` order (``"rgb"``, or ``"bgr"`` as OpenCV
        reads video) or a PIL image (always RGB). Returns float32 ``[N, D]``, L2-normalised
        (zero rows for boxes with no area, see the module doc): numpy, or a CPU tensor with
        ``return_tensors="pt"``.
        """
        return self.encode_frames([frame], [boxes], color=color, return_tensors=return_tensors)[0]

    def encode_frames(
        self,
        frames: Sequence,
        boxes: Sequence,
        *,
        color: str = "rgb",
        return_tensors: str = "np",
    ) -> list:
        """:meth:`encode` for several frames (cameras) at once: every crop of every frame goes
        through one batched forward (chunks of ``batch_size``); one result per frame, in order.
        """
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        if len(frames) != len(boxes):
            raise SureidError(
                f"encode_frames got {len(frames)} frames but {len(boxes)} box lists; pass one "
                "list of boxes per frame (an empty one for a frame without people)"
            )
        crops, rows = [], []
        for index, (frame, frame_boxes) in enumerate(zip(frames, boxes)):
            where = f"frame {index}" if len(frames) > 1 else "the frame"
            image = frame_array(frame, color, where)
            frame_boxes = as_boxes(frame_boxes, where)
            frame_crops = crop_boxes(image, frame_boxes, where)
            i = _first_empty(frame_crops)
            if self.on_empty == "raise" and i is not None:
                raise SureidError(
                    _empty_message(frame_boxes, i, image.shape, where)
                    + "; or pass on_empty='zeros' for zero rows"
                )
            rows.append(len(frame_crops))
            crops.extend(frame_crops)
        features = self._embed(crops)
        out = list(torch.split(features, rows)) if rows else []
        return [o.numpy() for o in out] if return_tensors == "np" else out

    def get_features(self, boxes, image) -> np.ndarray:
        """BoxMOT's appearance-backend call: ``boxes`` ``[N, 4]`` xyxy in the BGR ``image``.

        A box with no area raises here (BoxMOT rejects all-zero embeddings): drop such boxes
        before ``tracker.update``.
        """
        boxes = as_boxes(boxes, "the frame")
        image = frame_array(image, "bgr", "the frame")
        crops = crop_boxes(image, boxes, "the frame")
        i = _first_empty(crops)
        if i is not None:
            raise SureidError(
                _empty_message(boxes, i, image.shape, "the frame")
                + " before the tracker's update (BoxMOT refuses zero rows; encode() gives them)"
            )
        return self._embed(crops).numpy()

    def _embed(self, crops: list) -> torch.Tensor:
        """float32 [len(crops), D] on the CPU; a None crop (no area) gives a zero row."""
        out = torch.zeros(len(crops), self.embedding_dim)
        present = [i for i, crop in enumerate(crops) if crop is not None]
        if len(present) < len(crops):
            self._on_empty_rows(len(crops) - len(present))
        for start in range(0, len(present), self.batch_size):
            chunk = present[start : start + self.batch_size]
            with self._small_crop_warning:
                pixels = self.processor([crops[i] for i in chunk])["pixel_values"]
            out[chunk] = self._forward(pixels)
        return out

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings of a processed batch, on the CPU."""
        if self.model.training:  # a caller's .train() in between: keep dropping tokens
            self.model.eval()
        autocast, dtype = precision(self.model, self.device, self.autocast_dtype)
        with torch.inference_mode(), autocast:
            embeddings = self.model(pixel_values=pixels.to(self.device, dtype)).embeddings
        embeddings = F.normalize(embeddings.float(), dim=1).cpu()
        if not bool(torch.isfinite(embeddings).all()):
            raise SureidError(
                "the model gave non-finite embeddings; its weights may be broken, or float16 "
                "overflowed: try dtype='bfloat16' or 'float32'"
            )
        return embeddings

    def _on_empty_rows(self, count: int) -> None:
        if self.empty_boxes == 0:
            logger.warning(
                "%d box(es) have no area inside the frame; their embeddings are all zeros "
                "(on_empty='zeros'; the encoder counts them in .empty_boxes, this is said once)",
                count,
            )
        self.empty_boxes += count


class _FirstWarningOnly(logging.Filter):
    """A context that lets ``target`` logger's first warning through and drops the later ones."""

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target, self.seen = target, False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if self.seen:
            return False
        self.seen = True
        return True

    def __enter__(self):
        self.target.addFilter(self)

    def __exit__(self, *exc) -> None:
        self.target.removeFilter(self)


# --------------------------------------------------------------------------------------------
# Frames and boxes
# --------------------------------------------------------------------------------------------


def frame_array(frame, color: str, where: str = "the frame") -> np.ndarray:
    """``frame`` as an RGB uint8 ``HxWx3`` numpy array (a view where it can be)."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if isinstance(frame, Image.Image):
        if color != "rgb":
            raise SureidError(f"{where} is a PIL image, which is always RGB; pass color='rgb'")
        return np.asarray(frame.convert("RGB"))
    if not isinstance(frame, np.ndarray):
        raise SureidError(
            f"{where} is a {type(frame).__name__}; pass a numpy HxWx3 uint8 array "
            "(as OpenCV or imageio read video) or a PIL image"
        )
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise SureidError(
            f"{where} has shape {frame.shape} and dtype {frame.dtype}; pass HxWx3 uint8 pixels "
            "(a frame as OpenCV reads it; convert grayscale or RGBA frames to 3 channels)"
        )
    return frame[..., ::-1] if color == "bgr" else frame


def as_boxes(boxes, where: str = "the frame") -> np.ndarray:
    """``boxes`` (numpy, torch, or a list of 4-number boxes) as float64 ``[N, 4]``, checked."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().double().numpy()  # numpy has no bfloat16
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise SureidError(
            f"boxes for {where} have shape {array.shape}; pass [N, 4] boxes as x1, y1, x2, y2 "
            "pixels (take the first 4 columns of detector rows that carry scores and classes)"
        )
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SureidError(f"box {i} of {where} has a NaN or infinite coordinate: {array[i]}")
    inverted = (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        raise SureidError(
            f"box {i} of {where} is {array[i].tolist()}: x2 < x1 or y2 < y1. Boxes are x1, y1, "
            "x2, y2 corners; convert x, y, w, h boxes with x2 = x + w, y2 = y + h"
        )
    return array


def crop_boxes(image: np.ndarray, boxes, where: str = "the frame") -> list[np.ndarray | None]:
    """The pixels of each box in ``image`` (uint8 ``HxWx3``), clipped to the frame; None for a
    box with no area left (see the module doc)."""
    height, width = image.shape[:2]
    clipped, has_area = clip_to_frame(as_boxes(boxes, where), width, height)
    crops: list[np.ndarray | None] = []
    for (x1, y1, x2, y2), keep in zip(clipped.tolist(), has_area.tolist()):
        if not keep:
            crops.append(None)
            continue
        left, top = math.floor(x1), math.floor(y1)
        right, bottom = math.ceil(x2), math.ceil(y2)
        crops.append(np.ascontiguousarray(image[top:bottom, left:right]))
    return crops


def clip_to_frame(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, 4]`` ``x1, y1, x2, y2`` boxes clipped to a ``width`` x ``height`` frame, and which
    of them keep an area there (the rule for a box with no appearance, here and in
    ``sureid.tracking``)."""
    clipped = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    return clipped, (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


def _first_empty(crops: list) -> int | None:
    """The index of the first box with no area (a None crop), or None."""
    return next((i for i, crop in enumerate(crops) if crop is None), None)


def _empty_message(boxes: np.ndarray, i: int, shape, where: str) -> str:
    return (
        f"box {i} of {where} is {boxes[i].tolist()}: it has no area inside the "
        f"{shape[1]}x{shape[0]} frame, so it has no appearance; drop boxes with no area"
    )
