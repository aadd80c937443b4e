"""Train / eval transforms (torchvision.transforms.v2) and the batch-level random patch.

Train, per image: resize (bicubic) -> horizontal flip -> pad (10 at 256x128) + random crop ->
optional colour jitter -> float tensor -> normalise -> random erasing. Random patch needs other
images, so it runs on a whole batch (``RandomPatch``, used by the collators in ``noda.py``).
Eval: resize -> float tensor -> normalise, the same pixels as ``SureidImageProcessor`` (within
float rounding; ``tests/test_image_processing.py`` holds them to 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# The ImageNet normalisation the pretrained backbones expect: defined once, with the configs'
# defaults (configuration_sureid is the one module outside sureid.data that the data layer reads).
from ..configuration_sureid import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SIZE = (256, 128)


def _size(size: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive (height, width), got {size!r}")
    return (h, w)


def build_train_transform(
    size: Sequence[int] | int = DEFAULT_SIZE,
    *,
    flip_p: float = 0.5,
    padding: int | None = None,
    erasing_p: float = 0.5,
    color_jitter: bool | tuple[float, float, float, float] = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Per-image training augmentation; input a PIL image or uint8 tensor, output normalised float.

    ``color_jitter=True`` uses (brightness, contrast, saturation, hue) = (0.2, 0.2, 0.2, 0.0),
    the paper's addition for Occluded-REID / Partial-REID; pass a 4-tuple to choose.
    ``padding=None`` pads 10 pixels at 256x128 and proportionally less for smaller images (a
    10-pixel shift would move a 64x32 image by a third of its width).
    """
    size = _size(size)
    if padding is None:
        padding = max(1, round(10 * size[0] / 256))
    ops: list = [
        v2.ToImage(),
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=flip_p),
    ]
    if padding > 0:
        ops += [v2.Pad(padding), v2.RandomCrop(size)]
    if color_jitter:
        b, c, s, h = (0.2, 0.2, 0.2, 0.0) if color_jitter is True else color_jitter
        ops.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if erasing_p > 0:
        ops.append(v2.RandomErasing(p=erasing_p, value="random"))
    return v2.Compose(ops)


def build_eval_transform(
    size: Sequence[int] | int = DEFAULT_SIZE,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Resize (bicubic) and normalise; input a PIL image or uint8 tensor."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(_size(size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class RandomPatch:
    """Paste a rectangle cut from another image of the batch somewhere else (batch level).

    Each image is patched with probability ``p``: a patch of area ``area`` (fraction of the
    image) and aspect ratio in ``[ratio, 1/ratio]`` is cut from a different image of the batch
    (of the batch before any patching), flipped with probability 0.5 and pasted at a random
    position. This is torchreid's RandomPatch with the batch as its patch pool.
    """

    def __init__(
        self,
        p: float = 0.5,
        area: tuple[float, float] = (0.01, 0.5),
        ratio: float = 0.1,
        flip_p: float = 0.5,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomPatch probability must be in [0, 1], got {p}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"RandomPatch area must satisfy 0 < min <= max <= 1, got {area}")
        self.p = p
        self.area = area
        self.ratio = ratio
        self.flip_p = flip_p

    def _rand(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator))

    def patch_size(
        self, height: int, width: int, generator: torch.Generator | None
    ) -> tuple[int, int]:
        """A (h, w) that fits the image, drawn from the area and aspect ranges."""
        for _ in range(10):
            area = (
                height
                * width
                * (self.area[0] + (self.area[1] - self.area[0]) * self._rand(generator))
            )
            log_r = math.log(self.ratio) * (1 - 2 * self._rand(generator))
            aspect = math.exp(log_r)  # h / w
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 1 <= h <= height and 1 <= w <= width:
                return h, w
        return max(1, height // 4), max(1, width // 4)

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return a patched copy of ``batch`` [B, C, H, W]; a batch of one is returned as is."""
        if batch.ndim != 4:
            raise ValueError(f"RandomPatch expects a batch [B, C, H, W], got {tuple(batch.shape)}")
        n, _, height, width = batch.shape
        if n < 2 or self.p == 0:
            return batch
        out = batch.clone()
        for i in range(n):
            if self._rand(generator) >= self.p:
                continue
            j = int(torch.randint(n - 1, (), generator=generator))
            j = j + 1 if j >= i else j  # any image but i
            h, w = self.patch_size(height, width, generator)
            sy = int(torch.randint(height - h + 1, (), generator=generator))
            sx = int(torch.randint(width - w + 1, (), generator=generator))
            dy = int(torch.randint(height - h + 1, (), generator=generator))
            dx = int(torch.randint(width - w + 1, (), generator=generator))
            patch = batch[j, :, sy : sy + h, sx : sx + w]
            if self._rand(generator) < self.flip_p:
                patch = patch.flip(-1)
            out[i, :, dy : dy + h, dx : dx + w] = patch
        return out
