"""NODA (noise occlusion data augmentation): the occluder bank, the paste, and the collators.

The paper duplicates every batch: copy 1 gets the common augmentation, copy 2 the common
augmentation and then an occluder "unrelated to the training data" pasted at an image border.
Paste geometry (paper, sec. NODA): aspect ``a = h / w`` of the (jittered, flipped, cropped)
occluder; ``a > 2`` -> vertical, resized to ``H x U(W/3, W/2)`` and pasted at the left or right
edge; otherwise horizontal, resized to ``U(H/3, H/2) x W`` and pasted at the top or bottom edge.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomPatch,
    build_eval_transform,
    build_train_transform,
)

logger = logging.getLogger(__name__)

Side = Literal["top", "bottom", "left", "right"]

# --------------------------------------------------------------------------------------------
# Occluder bank
# --------------------------------------------------------------------------------------------


def _to_rgba_tensor(image: Image.Image | torch.Tensor, max_side: int | None) -> torch.Tensor:
    """A uint8 [4, h, w] tensor; PIL alpha (RGBA, LA, palette transparency) is kept."""
    if isinstance(image, torch.Tensor):
        t = image
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim != 3 or t.shape[0] not in (3, 4):
            raise ValueError(f"an occluder tensor must be [3|4, h, w], got {tuple(t.shape)}")
        if t.shape[0] == 3:
            t = torch.cat([t, torch.full_like(t[:1], 255)])
    else:
        img = image.convert("RGBA")
        if max_side is not None and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if max_side is not None and max(t.shape[1:]) > max_side:
        scale = max_side / max(t.shape[1:])
        size = [max(1, round(t.shape[1] * scale)), max(1, round(t.shape[2] * scale))]
        t = TF.resize(t, size, antialias=True)
    return t


class OccluderBank:
    """A list of RGBA occluder images (uint8 [4, h, w] tensors) that NODA pastes from.

    Build it from a folder (``from_folder``), from crops of a data set's own images
    (``from_dataset``, the "borrowed" occluders of FED), or use ``builtin()``, a procedurally
    drawn bank of everyday objects (synthetic: no dependency ships usable photographs).
    """

    def __init__(
        self,
        images: Iterable[Image.Image | torch.Tensor],
        *,
        names: Sequence[str] | None = None,
        max_side: int | None = 256,
        source: str = "images",
    ) -> None:
        self.images = [_to_rgba_tensor(im, max_side) for im in images]
        if not self.images:
            raise ValueError(f"the occluder bank from {source} is empty; it needs >= 1 image.")
        for i, t in enumerate(self.images):
            if int(t[3].max()) == 0:
                name = names[i] if names else f"#{i}"
                raise ValueError(f"occluder {name} from {source} is fully transparent.")
        self.names = (
            list(names) if names is not None else [f"{source}#{i}" for i in range(len(self))]
        )
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"OccluderBank({len(self)} occluders from {self.source})"

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        recursive: bool = True,
        skip_unreadable: bool = False,
        max_side: int | None = 256,
    ) -> OccluderBank:
        """Every PIL-readable file under ``folder`` (hidden files excepted); alpha honoured.

        An unreadable file raises a ``ValueError`` naming it, unless ``skip_unreadable=True``
        (then it is counted and logged).
        """
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"occluder folder {folder} does not exist; pass a folder of occluder images "
                "(PNG with alpha works best) or use OccluderBank.builtin()."
            )
        files = sorted(
            p
            for p in (folder.rglob("*") if recursive else folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
        )
        images, names, bad = [], [], []
        for p in files:
            try:
                with Image.open(p) as im:
                    im.load()
                    images.append(im.convert("RGBA"))
                names.append(str(p))
            except (UnidentifiedImageError, OSError) as err:
                if not skip_unreadable:
                    raise ValueError(
                        f"cannot read occluder image {p} ({err}); remove it from {folder} or "
                        "pass skip_unreadable=True."
                    ) from err
                bad.append(p)
        if bad:
            logger.warning(
                "skipped %d unreadable files in %s (first: %s)", len(bad), folder, bad[0]
            )
        if not images:
            raise ValueError(
                f"no readable occluder images in {folder} ({len(files)} files, {len(bad)} "
                "unreadable); add PIL-readable images or use OccluderBank.builtin()."
            )
        return cls(images, names=names, max_side=max_side, source=str(folder))

    @classmethod
    def from_dataset(
        cls,
        images: Any,
        num: int = 256,
        *,
        seed: int = 0,
        image_key: str = "image",
    ) -> OccluderBank:
        """Borrow occluders from a data set's images (FED): border bands cut from random images.

        ``images`` is a ``datasets.Dataset`` (its ``image_key`` column) or a sequence of PIL
        images / paths. Each occluder is a bottom or top band (1/4..1/2 of the height, full
        width) or a left/right band (1/4..1/3 of the width, full height) of a random image: the
        region where real occluders sit in pedestrian crops. Automatic, so some crops hold only
        background or a piece of the person; a hand-picked folder is better when available.
        """
        n = len(images)
        if n == 0:
            raise ValueError("cannot borrow occluders from an empty data set.")
        rng = np.random.default_rng(seed)
        crops, names = [], []
        for idx in rng.integers(0, n, size=num):
            item = images[int(idx)]
            if isinstance(item, dict):
                item = item[image_key]
            if isinstance(item, (str, Path)):
                with Image.open(item) as im:
                    item = im.convert("RGB")
            img = item.convert("RGB")
            w, h = img.size
            side = rng.integers(4)
            if side < 2:  # horizontal band
                bh = max(1, int(h * rng.uniform(0.25, 0.5)))
                box = (0, h - bh, w, h) if side == 0 else (0, 0, w, bh)
            else:
                bw = max(1, int(w * rng.uniform(0.25, 1 / 3)))
                box = (0, 0, bw, h) if side == 2 else (w - bw, 0, w, h)
            crops.append(img.crop(box))
            names.append(f"dataset[{int(idx)}]")
        return cls(crops, names=names, source="dataset crops")

    @classmethod
    def builtin(cls, num: int = 64, *, seed: int = 0) -> OccluderBank:
        """Procedurally drawn everyday occluders (poles, trees, bins, bags, cars, bushes, fences,
        bicycles, boxes, signs) with alpha; synthetic, documented in docs/datasets.md."""
        images, names = _builtin_occluders(int(num), int(seed))
        return cls(list(images), names=list(names), source=f"builtin(num={num}, seed={seed})")

    @classmethod
    def load(cls, source: str | Path | None = "builtin", **kwargs: Any) -> OccluderBank:
        """``"builtin"`` / ``None`` -> ``builtin()``; anything else is a folder path."""
        if source is None or str(source) == "builtin":
            return cls.builtin(**kwargs)
        return cls.from_folder(source, **kwargs)


# ---- procedural occluders ------------------------------------------------------------------


def _rgb(rng: np.random.Generator, base: Sequence[int], spread: int = 25) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)


def _pole(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(10, 22)), int(rng.integers(150, 230))
    im = Image.new("RGBA", (w + 30, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colour = _rgb(rng, [(90, 90, 95), (40, 70, 45), (60, 60, 70), (150, 150, 150)][rng.integers(4)])
    x0 = 15
    d.rectangle([x0, 0, x0 + w, h], fill=colour + (255,))
    d.rectangle(
        [x0 + w // 4, 0, x0 + w // 4 + max(1, w // 6), h], fill=_rgb(rng, (200, 200, 200)) + (255,)
    )
    if rng.random() < 0.5:  # red/white stripes (bollard) or a sign
        for y in range(0, h, 24):
            d.rectangle([x0, y, x0 + w, y + 10], fill=(200, 30, 30, 255))
    if rng.random() < 0.5:
        sw = w + 26
        d.rectangle(
            [2, 8, sw, 8 + sw],
            fill=_rgb(rng, (30, 80, 170), 40) + (255,),
            outline=(240, 240, 240, 255),
            width=2,
        )
    return im


def _tree(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(60, 90)), int(rng.integers(170, 240))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    tw = int(rng.integers(14, 26))
    x0 = (w - tw) // 2
    bark = _rgb(rng, (95, 65, 40))
    d.rectangle([x0, h // 3, x0 + tw, h], fill=bark + (255,))
    for _ in range(12):
        y = int(rng.integers(h // 3, h))
        d.line(
            [x0 + 2, y, x0 + tw - 2, y + int(rng.integers(-4, 5))],
            fill=_rgb(rng, (60, 40, 25)) + (255,),
            width=2,
        )
    for _ in range(40):
        cx, cy = rng.integers(0, w), rng.integers(0, h // 2)
        r = int(rng.integers(8, 20))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_rgb(rng, (50, 120, 45), 35) + (255,))
    return im


def _bin(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(55, 85)), int(rng.integers(75, 115))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colour = _rgb(rng, [(40, 110, 60), (70, 70, 75), (30, 60, 140), (25, 25, 25)][rng.integers(4)])
    inset = int(w * 0.08)
    d.polygon([(0, 12), (w - 1, 12), (w - 1 - inset, h - 1), (inset, h - 1)], fill=colour + (255,))
    d.rectangle([0, 0, w - 1, 14], fill=tuple(max(0, c - 30) for c in colour) + (255,))
    for x in range(inset + 6, w - inset - 4, 9):
        d.line([x, 18, x, h - 6], fill=tuple(max(0, c - 20) for c in colour) + (255,), width=2)
    return im


def _bag(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(45, 75)), int(rng.integers(45, 70))
    im = Image.new("RGBA", (w, h + 20), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colour = _rgb(rng, tuple(int(c) for c in rng.integers(20, 220, 3)), 10)
    d.arc(
        [w // 4, 2, 3 * w // 4, 40],
        180,
        360,
        fill=tuple(max(0, c - 40) for c in colour) + (255,),
        width=4,
    )
    d.rounded_rectangle([0, 20, w - 1, h + 19], radius=8, fill=colour + (255,))
    d.line([4, 32, w - 4, 32], fill=tuple(max(0, c - 40) for c in colour) + (255,), width=2)
    return im


def _car(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(150, 210)), int(rng.integers(65, 90))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    body = _rgb(rng, tuple(int(c) for c in rng.integers(20, 230, 3)), 10)
    d.rounded_rectangle([0, int(h * 0.35), w - 1, int(h * 0.85)], radius=10, fill=body + (255,))
    d.polygon(
        [
            (int(w * 0.2), int(h * 0.38)),
            (int(w * 0.32), 2),
            (int(w * 0.72), 2),
            (int(w * 0.85), int(h * 0.38)),
        ],
        fill=body + (255,),
    )
    glass = _rgb(rng, (120, 150, 175), 20)
    d.polygon(
        [
            (int(w * 0.27), int(h * 0.36)),
            (int(w * 0.35), 8),
            (int(w * 0.5), 8),
            (int(w * 0.5), int(h * 0.36)),
        ],
        fill=glass + (255,),
    )
    d.polygon(
        [
            (int(w * 0.53), int(h * 0.36)),
            (int(w * 0.53), 8),
            (int(w * 0.69), 8),
            (int(w * 0.79), int(h * 0.36)),
        ],
        fill=glass + (255,),
    )
    r = int(h * 0.17)
    for cx in (int(w * 0.22), int(w * 0.78)):
        d.ellipse([cx - r, h - 1 - 2 * r, cx + r, h - 1], fill=(20, 20, 20, 255))
        d.ellipse(
            [cx - r // 2, h - 1 - r - r // 2, cx + r // 2, h - 1 - r + r // 2],
            fill=(140, 140, 140, 255),
        )
    d.rectangle([w - 8, int(h * 0.45), w - 1, int(h * 0.55)], fill=(250, 230, 150, 255))
    return im


def _bush(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(110, 170)), int(rng.integers(55, 90))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    base = [(50, 115, 45), (70, 130, 60), (35, 90, 40), (110, 120, 50)][rng.integers(4)]
    for _ in range(int(w * h / 90)):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(h // 4, h))
        r = int(rng.integers(5, 14))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_rgb(rng, base, 35) + (255,))
    return im.filter(ImageFilter.SMOOTH)


def _fence(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(140, 200)), int(rng.integers(50, 75))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colour = _rgb(
        rng, [(150, 150, 155), (120, 80, 50), (30, 30, 30), (200, 200, 200)][rng.integers(4)]
    )
    for y in (4, h // 2, h - 8):
        d.rectangle([0, y, w - 1, y + 5], fill=colour + (255,))
    step = int(rng.integers(10, 20))
    for x in range(0, w, step):
        d.rectangle([x, 0, x + 4, h - 1], fill=colour + (255,))
    return im


def _bicycle(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(115, 150)), int(rng.integers(70, 90))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    frame = _rgb(rng, tuple(int(c) for c in rng.integers(20, 230, 3)), 10) + (255,)
    r = int(h * 0.33)
    c1, c2 = (r + 2, h - r - 2), (w - r - 3, h - r - 2)
    for c in (c1, c2):
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=(25, 25, 25, 255), width=4)
    top = (int(w * 0.55), int(h * 0.2))
    seat = (int(w * 0.35), int(h * 0.18))
    d.line([c1, (int(w * 0.45), c1[1]), top, c2], fill=frame, width=4)
    d.line([c1, seat, (int(w * 0.45), c1[1])], fill=frame, width=4)
    d.line([seat, top], fill=frame, width=4)
    d.line([top, (top[0] + 8, 2)], fill=(30, 30, 30, 255), width=3)
    return im


def _box(rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(60, 110)), int(rng.integers(45, 80))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colour = _rgb(rng, (170, 125, 75), 25)
    d.rectangle(
        [0, 0, w - 1, h - 1],
        fill=colour + (255,),
        outline=tuple(c // 2 for c in colour) + (255,),
        width=2,
    )
    d.rectangle([w // 2 - 6, 0, w // 2 + 6, h - 1], fill=_rgb(rng, (200, 180, 140)) + (255,))
    return im


_SHAPES: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "pole": _pole,
    "tree": _tree,
    "bin": _bin,
    "bag": _bag,
    "car": _car,
    "bush": _bush,
    "fence": _fence,
    "bicycle": _bicycle,
    "box": _box,
}


def draw_occluder(kind: str, rng: np.random.Generator) -> Image.Image:
    """One procedurally drawn RGBA occluder of ``kind`` (one of ``OCCLUDER_KINDS``), noisy."""
    if kind not in _SHAPES:
        raise ValueError(f"unknown occluder kind {kind!r}; expected one of {sorted(_SHAPES)}")
    im = _SHAPES[kind](rng)
    arr = np.array(im, dtype=np.int16)
    h, w = arr.shape[:2]
    shade = np.linspace(1.1, 0.8, h)[:, None, None] if rng.random() < 0.5 else 1.0
    noise = rng.normal(0, 9, size=(h, w, 1))
    arr[..., :3] = np.clip(arr[..., :3] * shade + noise, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGBA")


OCCLUDER_KINDS: tuple[str, ...] = tuple(_SHAPES)


@functools.lru_cache(maxsize=8)
def _builtin_occluders(num: int, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]]:
    if num < 1:
        raise ValueError(f"the built-in occluder bank needs num >= 1, got {num}")
    rng = np.random.default_rng([seed, 7919])
    images, names = [], []
    for i in range(num):
        kind = OCCLUDER_KINDS[i % len(OCCLUDER_KINDS)]
        images.append(_to_rgba_tensor(draw_occluder(kind, rng), None))
        names.append(f"builtin/{kind}_{i:03d}")
    return tuple(images), tuple(names)


# --------------------------------------------------------------------------------------------
# The paste
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where an occluder goes: a box flush with one image edge. After a paste, ``coverage``
    says which pixels of the box the occluder covers ([height, width] bools: its resized
    alpha over one half)."""

    top: int
    left: int
    height: int
    width: int
    side: Side
    vertical: bool
    coverage: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def mask(self, height: int, width: int) -> torch.Tensor:
        """[height, width] bools over the whole image: True where the occluder covers it."""
        full = torch.zeros(height, width, dtype=torch.bool)
        box = full[self.top : self.top + self.height, self.left : self.left + self.width]
        box |= True if self.coverage is None else self.coverage[: box.shape[0], : box.shape[1]]
        return full


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return low + int(torch.randint(high - low + 1, (), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def size_range(extent: int) -> tuple[int, int]:
    """The integer range ``[ceil(extent/3), floor(extent/2)]`` (at least one pixel)."""
    low = max(1, math.ceil(extent / 3))
    return low, max(low, extent // 2)


def occluder_placement(
    occluder_height: int,
    occluder_width: int,
    height: int,
    width: int,
    *,
    vertical_aspect: float = 2.0,
    generator: torch.Generator | None = None,
) -> Placement:
    """The NODA rule: aspect ``h/w > 2`` -> ``H x U(W/3, W/2)`` at left/right, else
    ``U(H/3, H/2) x W`` at top/bottom."""
    if occluder_height < 1 or occluder_width < 1:
        raise ValueError(f"empty occluder of size {occluder_height}x{occluder_width}")
    if occluder_height / occluder_width > vertical_aspect:
        w = _randint(*size_range(width), generator)
        side: Side = "left" if _uniform(0, 1, generator) < 0.5 else "right"
        return Placement(0, 0 if side == "left" else width - w, height, w, side, True)
    h = _randint(*size_range(height), generator)
    side = "top" if _uniform(0, 1, generator) < 0.5 else "bottom"
    return Placement(0 if side == "top" else height - h, 0, h, width, side, False)


class NodaPaste:
    """Paste a random occluder from ``bank`` onto an image with the NODA rules.

    The occluder first gets colour jitter (brightness/contrast/saturation factors in
    ``1 +- jitter``), a horizontal flip (p ``flip_p``) and a random crop keeping ``crop`` of
    each side. Works on float tensors [3, H, W] (in [0, 1], or normalised when ``mean``/``std``
    are given, as after the train transform), uint8 tensors, and PIL images. Deterministic
    under a seeded ``torch.Generator``; without one it uses torch's global RNG (which
    DataLoader workers seed per worker).
    """

    def __init__(
        self,
        bank: OccluderBank,
        *,
        jitter: float = 0.3,
        flip_p: float = 0.5,
        crop: tuple[float, float] = (0.7, 1.0),
        vertical_aspect: float = 2.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if len(bank) == 0:
            raise ValueError("NodaPaste needs a non-empty OccluderBank.")
        if not 0 < crop[0] <= crop[1] <= 1:
            raise ValueError(f"crop fractions must satisfy 0 < min <= max <= 1, got {crop}")
        self.bank = bank
        self.jitter = jitter
        self.flip_p = flip_p
        self.crop = crop
        self.vertical_aspect = vertical_aspect
        self.mean = None if mean is None else torch.tensor(list(mean)).view(3, 1, 1)
        self.std = None if std is None else torch.tensor(list(std)).view(3, 1, 1)

    def prepare(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Occluder ``index`` after jitter, flip and crop: float RGBA [4, h, w] in [0, 1]."""
        occ = self.bank[index].float() / 255.0
        rgb, alpha = occ[:3], occ[3:]
        if self.jitter > 0:
            j = self.jitter
            rgb = TF.adjust_brightness(rgb, _uniform(1 - j, 1 + j, generator))
            rgb = TF.adjust_contrast(rgb, _uniform(1 - j, 1 + j, generator))
            rgb = TF.adjust_saturation(rgb, _uniform(1 - j, 1 + j, generator))
        occ = torch.cat([rgb, alpha])
        if _uniform(0, 1, generator) < self.flip_p:
            occ = occ.flip(-1)
        _, h, w = occ.shape
        ch = max(1, round(h * _uniform(*self.crop, generator)))
        cw = max(1, round(w * _uniform(*self.crop, generator)))
        y, x = _randint(0, h - ch, generator), _randint(0, w - cw, generator)
        return occ[:, y : y + ch, x : x + cw]

    def apply(
        self, image: torch.Tensor | Image.Image, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | Image.Image, Placement]:
        """Return the occluded image (same type/dtype as given) and where the occluder went."""
        if isinstance(image, Image.Image):
            t = TF.pil_to_tensor(image.convert("RGB"))
            out, placement = self.apply(t, generator)
            return TF.to_pil_image(out), placement
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"NodaPaste expects an image [3, H, W], got {tuple(image.shape)}")
        index = _randint(0, len(self.bank) - 1, generator)
        occ = self.prepare(index, generator)
        _, height, width = image.shape
        p = occluder_placement(
            occ.shape[1],
            occ.shape[2],
            height,
            width,
            vertical_aspect=self.vertical_aspect,
            generator=generator,
        )
        alpha = occ[3:]
        premult = torch.cat([occ[:3] * alpha, alpha])  # premultiplied: no fringes on resize
        premult = F.interpolate(
            premult[None], size=(p.height, p.width), mode="bilinear", align_corners=False
        )[0].clamp(0, 1)
        a, rgb_a = premult[3:], premult[:3]
        region = image[:, p.top : p.top + p.height, p.left : p.left + p.width]
        if image.dtype == torch.uint8:
            blended = region.float() * (1 - a) + rgb_a * 255.0
            blended = blended.round().clamp(0, 255).to(torch.uint8)
        else:
            if self.mean is not None and self.std is not None:
                mean, std = self.mean.to(image), self.std.to(image)
                rgb_a = (rgb_a - a * mean) / std  # a * normalise(rgb)
            blended = region * (1 - a.to(image)) + rgb_a.to(image)
        out = image.clone()
        out[:, p.top : p.top + p.height, p.left : p.left + p.width] = blended
        return out, replace(p, coverage=a[0] > 0.5)

    def __call__(
        self, image: torch.Tensor | Image.Image, generator: torch.Generator | None = None
    ) -> torch.Tensor | Image.Image:
        return self.apply(image, generator)[0]


# --------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------


def _find_normalize(transform: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the first ``v2.Normalize`` inside ``transform`` (a Compose or a single op)."""
    ops = getattr(transform, "transforms", [transform])
    for op in ops:
        if isinstance(op, v2.Normalize):
            return list(op.mean), list(op.std)
    return None


def _field(sample: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in sample:
            return sample[k]
    raise ValueError(
        f"a sample lacks {' / '.join(repr(k) for k in keys)}; its keys are {sorted(sample)}. "
        "Samples need an image, a pid and a camid."
    )


class ReidCollator:
    """Plain collator: transform each sample, optional batch-level random patch.

    Input: samples (dicts) with ``image`` (PIL image or tensor), ``pid`` and ``camid``.
    Output: ``pixel_values`` [B, 3, H, W], ``labels`` [B], ``camids`` [B], ``occluded`` [B]
    (all False: nothing was pasted). Picklable, so it runs in DataLoader workers.
    """

    def __init__(
        self,
        transform: Callable[[Any], torch.Tensor],
        *,
        random_patch: RandomPatch | None = None,
        image_key: str = "image",
    ) -> None:
        self.transform = transform
        self.random_patch = random_patch
        self.image_key = image_key

    def _image(self, sample: dict) -> Any:
        image = _field(sample, (self.image_key, "pixel_values"))
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def _meta(self, samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.tensor([int(_field(s, ("pid", "label", "labels"))) for s in samples])
        camids = torch.tensor([int(_field(s, ("camid", "camids"))) for s in samples])
        return labels, camids

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples.")
        pixels = torch.stack([self.transform(self._image(s)) for s in samples])
        if self.random_patch is not None:
            pixels = self.random_patch(pixels)
        labels, camids = self._meta(samples)
        return {
            "pixel_values": pixels,
            "labels": labels,
            "camids": camids,
            "occluded": torch.zeros(len(samples), dtype=torch.bool),
        }


class NodaCollator(ReidCollator):
    """The NODA batch: 2B rows, copy 1 = common augmentation, copy 2 = common + occluder.

    Rows ``0..B-1`` are copy 1 (``occluded`` False), rows ``B..2B-1`` copy 2 (``occluded``
    True); labels and camids are repeated. Copy 2 draws its own common
    augmentation (``paired=False``) or reuses copy 1's augmented image (``paired=True``, so the
    pair differs only by the occluder). Random patch runs over each copy; the occluder is pasted last,
    normalised with the transform's own mean/std so it lands in the same colour space.
    """

    def __init__(
        self,
        transform: Callable[[Any], torch.Tensor],
        occluders: OccluderBank | NodaPaste,
        *,
        random_patch: RandomPatch | None = None,
        paired: bool = False,
        image_key: str = "image",
    ) -> None:
        super().__init__(transform, random_patch=random_patch, image_key=image_key)
        if isinstance(occluders, OccluderBank):
            norm = _find_normalize(transform)
            mean, std = norm if norm is not None else (None, None)
            occluders = NodaPaste(occluders, mean=mean, std=std)
        self.paste = occluders
        self.paired = paired

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples.")
        images = [self._image(s) for s in samples]
        copy1 = torch.stack([self.transform(im) for im in images])
        copy2 = copy1.clone() if self.paired else torch.stack([self.transform(im) for im in images])
        if self.random_patch is not None:
            copy1 = self.random_patch(copy1)
            copy2 = copy1.clone() if self.paired else self.random_patch(copy2)
        occluded = [self.paste.apply(x)[0] for x in copy2]
        labels, camids = self._meta(samples)
        n = len(samples)
        return {
            "pixel_values": torch.cat([copy1, torch.stack(occluded)]),
            "labels": labels.repeat(2),
            "camids": camids.repeat(2),
            "occluded": torch.cat(
                [torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]
            ),
        }


def build_train_collator(
    size: Sequence[int] | int = (256, 128),
    *,
    noda: bool = True,
    occluders: OccluderBank | str | Path | None = "builtin",
    color_jitter: bool = False,
    random_patch_p: float = 0.5,
    erasing_p: float = 0.5,
    paired: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ReidCollator:
    """The training collator: NODA (2B rows) when ``noda``, else plain (B rows).

    ``occluders``: an ``OccluderBank``, ``"builtin"`` or a folder of occluder images.
    """
    transform = build_train_transform(
        size, erasing_p=erasing_p, color_jitter=color_jitter, mean=mean, std=std
    )
    patch = RandomPatch(p=random_patch_p) if random_patch_p > 0 else None
    if not noda:
        return ReidCollator(transform, random_patch=patch)
    bank = occluders if isinstance(occluders, OccluderBank) else OccluderBank.load(occluders)
    return NodaCollator(transform, bank, random_patch=patch, paired=paired)


def build_eval_collator(
    size: Sequence[int] | int = (256, 128),
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ReidCollator:
    """Resize + normalise collator for query/gallery feature extraction."""
    return ReidCollator(build_eval_transform(size, mean=mean, std=std))
