"""The built-in synthetic occluded ReID set: procedurally drawn pedestrians, Duke file layout.

It exists so that tests and the CPU demo have an occluded ReID task without downloads. It is a
toy: identity lives in clothing colours and patterns, hair, body proportions and carried items;
each camera has its own background, illumination, viewpoint mix, scale and sharpness; every
query is occluded (by an object or another pedestrian covering a third to a half of the
person), a few gallery and train images are. It is *not* a stand-in for real data: no real
poses, textures, detector noise or crowds, and numbers on it say nothing about real benchmarks.
"""

from __future__ import annotations

import colorsys
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .datasets import SYNTHETIC_MASKS, SYNTHETIC_META
from .noda import OccluderBank

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: a visible-body mask per image (body_masks/); 3: the occluder's too
_SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# root/body_masks/<split folder>/<image stem>.png, and the same under occluder_masks/ (all black
# where nothing occludes): the folders the loader reads, in that order
MASK_DIRS = (SYNTHETIC_MASKS["body_mask_path"], SYNTHETIC_MASKS["occluder_mask_path"])

_TOPS = [  # named clothing colours; identities jitter around them
    (200, 30, 35),
    (30, 60, 160),
    (235, 235, 230),
    (25, 25, 28),
    (40, 130, 60),
    (240, 200, 40),
    (120, 120, 125),
    (150, 60, 150),
    (240, 130, 40),
    (90, 170, 210),
    (120, 70, 40),
    (230, 150, 170),
]
_BOTTOMS = [
    (30, 35, 70),
    (20, 20, 22),
    (110, 110, 115),
    (170, 150, 110),
    (60, 90, 150),
    (235, 235, 230),
    (90, 60, 40),
    (70, 90, 60),
]
_SKIN = [(245, 210, 180), (225, 180, 140), (190, 140, 100), (150, 100, 70), (100, 70, 50)]
_HAIR = [(20, 18, 15), (70, 45, 25), (130, 90, 50), (220, 190, 120), (170, 170, 170)]
_SHOES = [(20, 20, 20), (235, 235, 235), (120, 70, 40), (180, 30, 30), (60, 60, 160)]
PATTERNS = ("solid", "hstripes", "vstripes", "grid", "twotone", "logo")
ITEMS = ("none", "backpack", "shoulder_bag", "handbag")
VIEWS = ("front", "back", "side")


def _clothing_colour(
    rng: np.random.Generator, common: Sequence[Sequence[int]] = _TOPS
) -> tuple[int, ...]:
    """Half from a palette of common clothing colours (jittered), half anywhere in HSV."""
    if rng.random() < 0.5:
        return _jitter(rng, common[rng.integers(len(common))], 18)
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 0.95), rng.uniform(0.3, 0.95)
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))


def _jitter(rng: np.random.Generator, colour: Sequence[int], spread: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in colour)


@dataclass(frozen=True)
class Identity:
    """What makes one synthetic person recognisable."""

    top: tuple[int, ...]
    top2: tuple[int, ...]
    pattern: str
    stripes: int
    long_sleeves: bool
    bottom: tuple[int, ...]
    bottom_kind: str  # trousers / shorts / skirt
    skin: tuple[int, ...]
    hair: tuple[int, ...]
    hair_kind: str  # short / long / cap
    cap: tuple[int, ...]
    shoes: tuple[int, ...]
    item: str
    item_colour: tuple[int, ...]
    item_right: bool
    height: float  # of the image height
    width: float  # shoulder half-width, of the figure height
    head: float
    legs: float  # leg length, of the figure height

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Identity:
        return cls(
            top=_clothing_colour(rng),
            top2=_clothing_colour(rng),
            pattern=PATTERNS[rng.integers(len(PATTERNS))],
            stripes=int(rng.integers(3, 6)),
            long_sleeves=bool(rng.random() < 0.5),
            bottom=_clothing_colour(rng, _BOTTOMS),
            bottom_kind=["trousers", "trousers", "shorts", "skirt"][rng.integers(4)],
            skin=_jitter(rng, _SKIN[rng.integers(len(_SKIN))], 8),
            hair=_jitter(rng, _HAIR[rng.integers(len(_HAIR))], 10),
            hair_kind=["short", "short", "long", "cap"][rng.integers(4)],
            cap=_jitter(rng, _TOPS[rng.integers(len(_TOPS))], 15),
            shoes=_jitter(rng, _SHOES[rng.integers(len(_SHOES))], 10),
            item=ITEMS[rng.integers(len(ITEMS))],
            item_colour=_jitter(rng, _TOPS[rng.integers(len(_TOPS))], 20),
            item_right=bool(rng.random() < 0.5),
            height=float(rng.uniform(0.80, 0.94)),
            width=float(rng.uniform(0.085, 0.125)),
            head=float(rng.uniform(0.055, 0.072)),
            legs=float(rng.uniform(0.44, 0.52)),
        )


@dataclass(frozen=True)
class Camera:
    """What one camera changes: background, light, preferred viewpoint, scale, sharpness."""

    background: np.ndarray  # [H, 2W, 3] uint8 scene; each image crops a random window
    gain: tuple[float, float, float]
    view: str
    flip: bool
    scale: float
    offset: float
    blur: float  # down-up sampling factor (1 = sharp)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = ["street", "indoor", "park", "brick", "shop"][rng.integers(5)]
    w2 = 2 * width
    im = Image.new("RGB", (w2, height))
    d = ImageDraw.Draw(im)
    horizon = int(height * rng.uniform(0.55, 0.75))
    ground = _jitter(rng, (120, 120, 120), 40)
    if kind == "street":
        sky = _jitter(rng, (150, 180, 215), 25)
        d.rectangle([0, 0, w2, horizon], fill=sky)
        for x in range(0, w2, int(rng.integers(30, 60))):
            bw, bh = int(rng.integers(25, 60)), int(rng.integers(horizon // 3, horizon))
            col = _jitter(rng, (150, 140, 130), 50)
            d.rectangle([x, horizon - bh, x + bw, horizon], fill=col)
            for wy in range(horizon - bh + 6, horizon - 8, 14):
                d.rectangle([x + 5, wy, x + bw - 5, wy + 6], fill=_jitter(rng, (70, 90, 110), 20))
    elif kind == "indoor":
        wall = _jitter(rng, (200, 195, 180), 40)
        d.rectangle([0, 0, w2, horizon], fill=wall)
        d.rectangle([0, horizon - 20, w2, horizon - 12], fill=_jitter(rng, (120, 100, 80), 30))
        ground = _jitter(rng, (170, 160, 150), 40)
    elif kind == "park":
        d.rectangle([0, 0, w2, horizon], fill=_jitter(rng, (160, 200, 230), 20))
        for _ in range(30):
            cx, cy, r = rng.integers(0, w2), rng.integers(0, horizon), rng.integers(10, 30)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (60, 120, 60), 30))
        ground = _jitter(rng, (90, 150, 70), 30)
    elif kind == "brick":
        base = _jitter(rng, (150, 75, 55), 30)
        d.rectangle([0, 0, w2, horizon], fill=base)
        for row, y in enumerate(range(0, horizon, 10)):
            d.line([0, y, w2, y], fill=(200, 190, 180), width=1)
            for x in range((row % 2) * 10, w2, 20):
                d.line([x, y, x, y + 10], fill=(200, 190, 180), width=1)
    else:  # shop windows with coloured goods: clutter in the person's colours
        d.rectangle([0, 0, w2, horizon], fill=_jitter(rng, (90, 90, 100), 30))
        for _ in range(25):
            x, y = int(rng.integers(0, w2)), int(rng.integers(0, horizon - 10))
            col = _TOPS[rng.integers(len(_TOPS))]
            d.rectangle(
                [x, y, x + int(rng.integers(6, 20)), y + int(rng.integers(6, 20))], fill=col
            )
    d.rectangle([0, horizon, w2, height], fill=ground)
    for y in range(horizon + 8, height, int(rng.integers(12, 25))):
        d.line([0, y, w2, y], fill=_jitter(rng, ground, 25), width=1)
    arr = np.asarray(im, dtype=np.float32)
    arr += rng.normal(0, 6, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _camera(rng: np.random.Generator, height: int, width: int) -> Camera:
    brightness = rng.uniform(0.75, 1.15)
    tint = rng.uniform(-0.06, 0.06, size=3)
    return Camera(
        background=_background(rng, height, width),
        gain=tuple(float(brightness * (1 + t)) for t in tint),
        view=VIEWS[rng.integers(len(VIEWS))],
        flip=bool(rng.random() < 0.5),
        scale=float(rng.uniform(0.85, 1.0)),
        offset=float(rng.uniform(-0.08, 0.08)),
        blur=float([1.0, 1.0, 1.6, 2.2][rng.integers(4)]),
    )


def _shade(colour: Sequence[int], f: float) -> tuple[int, ...]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in colour)


@dataclass(frozen=True)
class _Figure:
    """Where one drawn person's parts go, in pixels: the layout :func:`draw_person`'s steps share."""

    ident: Identity
    view: str
    side: bool
    cx: float
    feet: float
    u: float  # figure height
    top: float  # top of the head
    r_head: float
    sw: float  # shoulder half-width
    hw: float  # hip half-width
    y_sh: float  # shoulder line
    y_hip: float
    y_knee: float
    leg_w: float
    gap: float  # how far each foot steps out from its hip
    arm_w: int
    arm_len: float
    swing: float
    skin: tuple[int, ...]

    @classmethod
    def layout(
        cls,
        ident: Identity,
        layer_height: int,
        *,
        cx: float,
        feet: float,
        scale: float,
        view: str,
        stride: float,
        swing: float,
    ) -> _Figure:
        u = ident.height * scale * layer_height
        side = view == "side"
        r_head = ident.head * u
        sw = ident.width * u * (0.6 if side else 1.0)
        top = feet - u
        y_hip = feet - ident.legs * u
        return cls(
            ident=ident,
            view=view,
            side=side,
            cx=cx,
            feet=feet,
            u=u,
            top=top,
            r_head=r_head,
            sw=sw,
            hw=sw * 0.85,
            y_sh=top + 2 * r_head + 0.015 * u,
            y_hip=y_hip,
            y_knee=(y_hip + feet) / 2,
            leg_w=0.055 * u,
            gap=stride * 0.12 * u,
            arm_w=max(2, int(0.045 * u)),
            arm_len=0.34 * u,
            swing=swing,
            skin=ident.skin + (255,),
        )

    @property
    def t_len(self) -> float:
        """Torso length, shoulders to hips."""
        return self.y_hip - self.y_sh

    @property
    def item_x(self) -> float:
        """Where a carried item hangs: just outside the shoulder on the item's side."""
        return self.cx + (self.sw + 0.02 * self.u) * (1 if self.ident.item_right else -1)

    def box(self) -> tuple[int, int, int, int]:
        """The figure's bounding box (x0, y0, x1, y1), arms, skirt and stride included."""
        skirt = self.hw * 1.5 if self.ident.bottom_kind == "skirt" else 0
        half_w = max(self.sw + self.arm_w, skirt) + self.gap
        return int(self.cx - half_w), int(self.top), int(self.cx + half_w), int(self.feet)


def _opaque(colour: Sequence[int]) -> tuple[int, ...]:
    return tuple(colour) + (255,)


def draw_person(
    layer: Image.Image,
    ident: Identity,
    *,
    cx: float,
    feet: float,
    scale: float,
    view: str,
    stride: float,
    swing: float,
) -> tuple[int, int, int, int]:
    """Draw ``ident`` on the RGBA ``layer``, feet at (cx, feet); return its box (x0, y0, x1, y1).

    ``view`` is front / back / side (side faces right; mirror the layer to face left). Parts are
    drawn back to front: legs, items carried behind, arms, torso, items carried in front, head.
    """
    fig = _Figure.layout(
        ident, layer.height, cx=cx, feet=feet, scale=scale, view=view, stride=stride, swing=swing
    )
    d = ImageDraw.Draw(layer)
    _draw_legs(d, fig)
    _draw_items_behind(d, fig)
    _draw_arms(d, fig)
    _draw_torso(d, fig)
    _draw_items_in_front(d, fig)
    _draw_head(d, fig)
    return fig.box()


def _draw_legs(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Legs, shoes, and bare shins for shorts or a skirt over the thighs (drawn first: the torso
    covers their tops)."""
    ident, u, leg_w, feet = f.ident, f.u, f.leg_w, f.feet
    for k, sgn in enumerate((-1, 1)):
        x_hip = f.cx + sgn * f.hw * (0.15 if f.side else 0.5)
        x_foot = x_hip + sgn * f.gap
        colour = _shade(ident.bottom, 0.85 if (f.side and k == 0) else 1.0)
        d.polygon(
            [
                (x_hip - leg_w / 2, f.y_hip),
                (x_hip + leg_w / 2, f.y_hip),
                (x_foot + leg_w / 2, feet),
                (x_foot - leg_w / 2, feet),
            ],
            fill=_opaque(colour),
        )
        if ident.bottom_kind == "shorts":
            xk = (x_hip + x_foot) / 2
            d.polygon(
                [
                    (xk - leg_w / 2, f.y_knee),
                    (xk + leg_w / 2, f.y_knee),
                    (x_foot + leg_w / 2, feet),
                    (x_foot - leg_w / 2, feet),
                ],
                fill=f.skin,
            )
        d.ellipse(
            [
                x_foot - leg_w * 0.8,
                feet - leg_w * 0.6,
                x_foot + leg_w * (1.3 if f.side else 0.8),
                feet + leg_w * 0.2,
            ],
            fill=_opaque(ident.shoes),
        )
    if ident.bottom_kind == "skirt":
        d.polygon(
            [
                (f.cx - f.hw, f.y_hip - 0.01 * u),
                (f.cx + f.hw, f.y_hip - 0.01 * u),
                (f.cx + f.hw * 1.5, f.y_knee),
                (f.cx - f.hw * 1.5, f.y_knee),
            ],
            fill=_opaque(ident.bottom),
        )


def _draw_items_behind(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Carried items on the far side of the body (a backpack seen from the side)."""
    if f.ident.item == "backpack" and f.side:
        u, sw, cx, y_sh = f.u, f.sw, f.cx, f.y_sh
        d.rounded_rectangle(
            [cx - sw - 0.09 * u, y_sh + 0.02 * u, cx - sw + 0.02 * u, y_sh + 0.22 * u],
            radius=3,
            fill=_opaque(f.ident.item_colour),
        )


def _draw_arms(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Both arms (one from the side), swinging with ``swing``; sleeves long or short."""
    ident, u, arm_w, y_sh = f.ident, f.u, f.arm_w, f.y_sh
    for sgn in (-1, 1) if not f.side else (1,):
        x0 = f.cx + sgn * (f.sw + arm_w * 0.3) if not f.side else f.cx
        x1 = x0 + (sgn * 0.02 * u if not f.side else 0) + f.swing * 0.08 * u * sgn
        elbow = (x0 + (x1 - x0) / 2, y_sh + f.arm_len / 2)
        hand = (x1, y_sh + f.arm_len)
        sleeve = _opaque(ident.top)
        d.line([(x0, y_sh + arm_w / 2), elbow], fill=sleeve, width=arm_w)
        d.line([elbow, hand], fill=sleeve if ident.long_sleeves else f.skin, width=arm_w)
        d.ellipse(
            [hand[0] - arm_w / 2, hand[1] - arm_w / 2, hand[0] + arm_w / 2, hand[1] + arm_w / 2],
            fill=f.skin,
        )


def _draw_torso(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """The torso (a trapezoid, shoulders to hips) and its pattern in the second colour."""
    ident, cx, sw, hw, y_sh, y_hip = f.ident, f.cx, f.sw, f.hw, f.y_sh, f.y_hip
    d.polygon(
        [(cx - sw, y_sh), (cx + sw, y_sh), (cx + hw, y_hip), (cx - hw, y_hip)],
        fill=_opaque(ident.top),
    )

    def band(y0: float, y1: float, colour: Sequence[int]) -> None:
        def half(y: float) -> float:
            return sw + (hw - sw) * (y - y_sh) / max(1e-6, y_hip - y_sh)

        d.polygon(
            [(cx - half(y0), y0), (cx + half(y0), y0), (cx + half(y1), y1), (cx - half(y1), y1)],
            fill=_opaque(colour),
        )

    t_len = f.t_len
    if ident.pattern in ("hstripes", "grid"):
        step = t_len / (2 * ident.stripes)
        for i in range(ident.stripes):
            band(
                y_sh + (2 * i + 1) * step,
                y_sh + (2 * i + 1.6 if ident.pattern == "grid" else 2 * i + 2) * step,
                ident.top2,
            )
    if ident.pattern in ("vstripes", "grid") and not f.side:
        n = ident.stripes
        for i in range(n):
            x = cx - hw + (2 * i + 0.5) * hw / n
            d.rectangle(
                [x, y_sh, x + hw / n * (0.6 if ident.pattern == "grid" else 1.0), y_hip],
                fill=_opaque(ident.top2),
            )
    if ident.pattern == "twotone":
        band(y_sh, y_sh + t_len * 0.45, ident.top2)
    if ident.pattern == "logo" and f.view == "front":
        s = 0.22 * sw
        d.ellipse(
            [cx - 2 * s, y_sh + t_len * 0.25, cx + 2 * s, y_sh + t_len * 0.25 + 4 * s],
            fill=_opaque(ident.top2),
        )


def _draw_items_in_front(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Carried items over the torso: a backpack (its body from behind, its straps from the
    front), a shoulder bag with its strap, or a handbag that swings with the hand."""
    ident, u, cx, sw, y_sh, y_hip = f.ident, f.u, f.cx, f.sw, f.y_sh, f.y_hip
    colour = _opaque(ident.item_colour)
    if ident.item == "backpack" and f.view == "back":
        d.rounded_rectangle(
            [cx - sw * 0.55, y_sh + 0.04 * u, cx + sw * 0.55, y_sh + f.t_len * 0.7],
            radius=4,
            fill=colour,
        )
    elif ident.item == "backpack" and f.view == "front":
        for sgn in (-1, 1):
            d.line(
                [(cx + sgn * sw * 0.55, y_sh), (cx + sgn * sw * 0.6, y_sh + f.t_len * 0.6)],
                fill=_opaque(_shade(ident.item_colour, 0.8)),
                width=max(2, int(0.02 * u)),
            )
    elif ident.item == "shoulder_bag":
        bx = f.item_x if not f.side else cx + 0.02 * u
        d.line(
            [(cx - sw * 0.7 * (1 if ident.item_right else -1), y_sh), (bx, y_hip - 0.04 * u)],
            fill=_opaque(_shade(ident.item_colour, 0.7)),
            width=max(2, int(0.015 * u)),
        )
        d.rectangle([bx - 0.05 * u, y_hip - 0.06 * u, bx + 0.05 * u, y_hip + 0.04 * u], fill=colour)
    elif ident.item == "handbag":
        hx = f.item_x + f.swing * 0.08 * u * (1 if ident.item_right else -1)
        hy = y_sh + f.arm_len
        d.rectangle([hx - 0.045 * u, hy, hx + 0.045 * u, hy + 0.08 * u], fill=colour)


def _draw_head(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Head and hair: short, long (down to the shoulders) or a cap with its peak forward."""
    ident, u, cx, r, top = f.ident, f.u, f.cx, f.r_head, f.top
    hair = _opaque(ident.hair)
    hy = top + r
    d.ellipse([cx - r, top, cx + r, top + 2 * r], fill=f.skin)
    if ident.hair_kind == "long":
        d.rectangle([cx - r * 1.05, hy, cx + r * 1.05, f.y_sh + 0.06 * u], fill=hair)
        d.ellipse(
            [cx - r, top, cx + r, top + 2 * r],
            fill=f.skin if f.view != "back" else hair,
        )
    if ident.hair_kind == "cap":
        cap = _opaque(ident.cap)
        d.chord([cx - r * 1.1, top - 0.1 * r, cx + r * 1.1, top + 1.8 * r], 180, 360, fill=cap)
        d.rectangle([cx, hy - 0.2 * r, cx + r * (1.8 if f.side else 1.2), hy], fill=cap)
    else:
        d.chord([cx - r, top, cx + r, top + 2 * r], 180, 360, fill=hair)
        if f.view == "back":
            d.ellipse([cx - r, top, cx + r, top + 2 * r], fill=hair)


def _occlude(
    image: Image.Image,
    box: tuple[int, int, int, int],
    rng: np.random.Generator,
    bank: OccluderBank,
) -> np.ndarray:
    """Cover a third to a half of the person in ``box`` with an object or another pedestrian.

    Returns the occluder's coverage, a boolean [H, W] array (True where it hides what is behind).
    """
    W, H = image.size
    x0, y0, x1, y1 = box
    pw, ph = max(1, x1 - x0), max(1, y1 - y0)
    mode = rng.choice(["bottom", "side", "top", "person"], p=[0.45, 0.25, 0.05, 0.25])
    if mode == "person":
        layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
        sgn = 1 if rng.random() < 0.5 else -1
        cover = rng.uniform(1 / 3, 1 / 2)
        cx = (x0 + x1) / 2 + sgn * pw * (1.0 - cover)
        draw_person(
            layer,
            Identity.sample(rng),
            cx=cx,
            feet=min(H - 1, y1 + rng.uniform(0, 0.06) * H),
            scale=rng.uniform(1.0, 1.15),
            view=VIEWS[rng.integers(3)],
            stride=rng.uniform(0, 1),
            swing=rng.uniform(-1, 1),
        )
        image.alpha_composite(layer)
        return np.asarray(layer)[..., 3] >= 128
    occ = bank[int(rng.integers(len(bank)))]
    aspect = occ.shape[1] / occ.shape[2]
    if mode == "side" or aspect > 2:
        ow, oh = int(pw * rng.uniform(1 / 3, 1 / 2)), int(H * rng.uniform(0.9, 1.1))
        ox = x0 if rng.random() < 0.5 else x1 - ow
        oy = H - oh + int(rng.uniform(0, 0.05) * H)
    else:
        oh = int(ph * rng.uniform(1 / 3, 1 / 2))
        ow = int(max(pw * rng.uniform(1.1, 1.8), W * 0.7))
        ox = int((x0 + x1) / 2 - ow / 2 + rng.uniform(-0.15, 0.15) * W)
        oy = y0 if mode == "top" else y1 - oh + int(rng.uniform(0, 0.04) * H)
    pil = Image.fromarray(occ.permute(1, 2, 0).numpy(), "RGBA")
    if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pil = pil.resize((max(1, ow), max(1, oh)), Image.Resampling.BILINEAR)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste(pil, (int(ox), int(oy)))  # clipped at the borders
    image.alpha_composite(layer)
    return np.asarray(layer)[..., 3] >= 128


def render(
    ident: Identity,
    camera: Camera,
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    occluded: bool,
    bank: OccluderBank,
    with_body_mask: bool = False,
    with_occluder_mask: bool = False,
) -> Image.Image | tuple:
    """One image of ``ident`` seen by ``camera`` (RGB, ``size`` = (height, width)).

    ``with_body_mask``: also return the visible body, a boolean [H, W] array: the person's pixels
    that no occluder covers (what a ReID model should look at). ``with_occluder_mask``: also
    return the occluder's coverage, a boolean [H, W] array (all False when ``occluded`` is
    False). The image comes first, then the masks asked for, in this order.
    """
    H, W = size
    x = int(rng.integers(0, camera.background.shape[1] - W + 1))
    image = Image.fromarray(camera.background[:, x : x + W]).convert("RGBA")
    view = camera.view if rng.random() < 0.7 else VIEWS[rng.integers(len(VIEWS))]
    flip = camera.flip if rng.random() < 0.8 else not camera.flip
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    cx = W * (0.5 + camera.offset + rng.uniform(-0.05, 0.05))
    feet = H * rng.uniform(0.95, 0.99)
    box = draw_person(
        layer,
        ident,
        cx=cx,
        feet=feet,
        scale=camera.scale * rng.uniform(0.95, 1.05),
        view=view,
        stride=rng.uniform(0, 1),
        swing=rng.uniform(-1, 1),
    )
    if flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = (W - box[2], box[1], W - box[0], box[3])
    image.alpha_composite(layer)
    body = np.asarray(layer)[..., 3] >= 128
    occluder = np.zeros_like(body)
    if occluded:
        occluder = _occlude(image, box, rng, bank)
        body = body & ~occluder
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    gain = np.array(camera.gain) * rng.uniform(0.93, 1.07)
    arr = np.clip(arr * gain + rng.normal(0, 3, size=arr.shape), 0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    if camera.blur > 1:
        small = (max(1, int(W / camera.blur)), max(1, int(H / camera.blur)))
        out = out.resize(small, Image.Resampling.BILINEAR).resize((W, H), Image.Resampling.BILINEAR)
    elif rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(0.6))
    masks = [m for m, wanted in ((body, with_body_mask), (occluder, with_occluder_mask)) if wanted]
    return (out, *masks) if masks else out


def _params(**kwargs) -> dict:
    return {"format_version": FORMAT_VERSION, **kwargs}


def make_synthetic_reid(
    root: str | Path,
    num_train_ids: int = 32,
    num_test_ids: int = 32,
    *,
    seed: int = 0,
    size: tuple[int, int] = (256, 128),
    images_per_train_id: int = 8,
    queries_per_id: int = 2,
    gallery_per_id: int = 6,
    num_cameras: int = 6,
    train_occluded_fraction: float = 0.1,
    gallery_occluded_fraction: float = 0.15,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic occluded set into ``root`` in the (Occluded-)Duke layout.

    ``root/{bounding_box_train,query,bounding_box_test}/0001_c1_f0000001.jpg`` plus
    ``root/sureid_synthetic.json`` (parameters and per-image occlusion flags) and, per image, its
    visible body (the person's pixels no occluder covers) as a black/white PNG
    ``root/body_masks/<split folder>/0001_c1_f0000001.png`` and what its occluder covers (all
    black when nothing does) as ``root/occluder_masks/<split folder>/0001_c1_f0000001.png``,
    so both ``load_reid_dataset("synthetic", root)`` (with ``occluded``, ``body_mask_path`` and
    ``occluder_mask_path`` columns) and
    ``load_reid_dataset("occluded_duke", root)`` read it. Train ids are 1..N, test ids
    N+1..N+M (disjoint). Each query has a match in another camera. If ``root`` already holds
    a set made with the same parameters it is reused; a different one raises unless
    ``overwrite=True`` (which deletes only the three split folders, the two mask folders and the
    metadata file).
    """
    root = Path(root).expanduser()
    size = (int(size[0]), int(size[1]))
    _check_set_arguments(
        num_train_ids,
        num_test_ids,
        num_cameras,
        queries_per_id,
        gallery_per_id,
        images_per_train_id,
    )
    params = _params(
        num_train_ids=num_train_ids,
        num_test_ids=num_test_ids,
        seed=seed,
        size=list(size),
        images_per_train_id=images_per_train_id,
        queries_per_id=queries_per_id,
        gallery_per_id=gallery_per_id,
        num_cameras=num_cameras,
        train_occluded_fraction=train_occluded_fraction,
        gallery_occluded_fraction=gallery_occluded_fraction,
    )
    if _reusable_or_cleared(root, params, overwrite):
        logger.info("reusing the synthetic set in %s", root)
        return root
    # One generator draws everything in a fixed order (cameras, then train ids, then test ids):
    # the same parameters draw the same images.
    rng = np.random.default_rng([seed, 1])
    cameras = [_camera(rng, *size) for _ in range(num_cameras)]
    bank = OccluderBank.builtin(num=36, seed=seed + 1001)  # not NODA's default bank instances
    writer = _SetWriter(root, size, cameras, bank, rng)
    _write_train_ids(
        writer, range(1, num_train_ids + 1), images_per_train_id, train_occluded_fraction
    )
    _write_test_ids(
        writer,
        range(num_train_ids + 1, num_train_ids + num_test_ids + 1),
        queries_per_id,
        gallery_per_id,
        gallery_occluded_fraction,
    )
    _write_metadata(root, params, writer.occluded)
    return root


def _check_set_arguments(
    num_train_ids: int,
    num_test_ids: int,
    num_cameras: int,
    queries_per_id: int,
    gallery_per_id: int,
    images_per_train_id: int,
) -> None:
    if num_train_ids < 1 or num_test_ids < 1:
        raise ValueError("num_train_ids and num_test_ids must be >= 1.")
    if not 2 <= num_cameras <= 8:
        raise ValueError(f"num_cameras must be in 2..8 (Duke file names), got {num_cameras}.")
    if queries_per_id < 1 or gallery_per_id < 1 or images_per_train_id < 1:
        raise ValueError("queries_per_id, gallery_per_id and images_per_train_id must be >= 1.")
    if queries_per_id >= num_cameras:
        raise ValueError(
            f"queries_per_id ({queries_per_id}) must be < num_cameras ({num_cameras})."
        )


def _reusable_or_cleared(root: Path, params: dict, overwrite: bool) -> bool:
    """True when ``root`` already holds a complete set made with ``params``; otherwise clear
    what an earlier set left (only with ``overwrite``, else raise) and make empty split folders."""
    meta_path = root / SYNTHETIC_META
    split_paths = [root / d for d in _SPLIT_DIRS.values()]
    mask_paths = [root / m / d for m in MASK_DIRS for d in _SPLIT_DIRS.values()]
    if meta_path.is_file():
        with open(meta_path) as f:
            old = json.load(f).get("params")
        complete = all(p.is_dir() for p in split_paths + mask_paths)
        if old == params and complete:
            return True
        if not overwrite:
            problem = (
                "an incomplete synthetic set (a split or mask folder is missing)"
                if old == params
                else f"a synthetic set made with other parameters ({old})"
            )
            raise FileExistsError(
                f"{root} holds {problem}; pass overwrite=True to replace it, or choose another "
                "root."
            )
    elif any(p.exists() for p in split_paths) and not overwrite:
        raise FileExistsError(
            f"{root} already has split folders not made by make_synthetic_reid; choose an "
            "empty root or pass overwrite=True to replace them."
        )
    for p in [*split_paths, *(root / m for m in MASK_DIRS)]:
        if p.exists():
            shutil.rmtree(p)
    meta_path.unlink(missing_ok=True)
    for p in split_paths + mask_paths:
        p.mkdir(parents=True)
    return False


class _SetWriter:
    """Renders and saves one image (and its two masks) at a time, numbering the frames and
    noting each image's occlusion flag for the metadata file."""

    def __init__(
        self,
        root: Path,
        size: tuple[int, int],
        cameras: list[Camera],
        bank: OccluderBank,
        rng: np.random.Generator,
    ):
        self.root, self.size, self.cameras, self.bank, self.rng = root, size, cameras, bank, rng
        self.frame = 0
        self.occluded: dict[str, bool] = {}

    def save(self, split: str, pid: int, cam: int, ident: Identity, occ: bool) -> None:
        self.frame += 1
        folder = _SPLIT_DIRS[split]
        name = f"{pid:04d}_c{cam + 1}_f{self.frame:07d}.jpg"
        img, body, occluder = render(
            ident,
            self.cameras[cam],
            self.rng,
            self.size,
            occluded=occ,
            bank=self.bank,
            with_body_mask=True,
            with_occluder_mask=True,
        )
        img.save(self.root / folder / name, quality=92)
        mask_name = name.rsplit(".", 1)[0] + ".png"
        for mask_dir, mask in zip(MASK_DIRS, (body, occluder), strict=True):
            Image.fromarray(mask).save(self.root / mask_dir / folder / mask_name)
        self.occluded[f"{folder}/{name}"] = occ


def _write_train_ids(
    writer: _SetWriter, pids: range, images_per_id: int, occluded_fraction: float
) -> None:
    """Each train id in two to four cameras, its images spread over them in turn."""
    rng, all_cams = writer.rng, np.arange(len(writer.cameras))
    for pid in pids:
        ident = Identity.sample(rng)
        size = min(len(all_cams), int(rng.integers(2, 5)))
        cams = rng.choice(all_cams, size=size, replace=False)
        for i in range(images_per_id):
            occ = rng.random() < occluded_fraction
            writer.save("train", pid, int(cams[i % len(cams)]), ident, occ)


def _write_test_ids(
    writer: _SetWriter,
    pids: range,
    queries_per_id: int,
    gallery_per_id: int,
    gallery_occluded_fraction: float,
) -> None:
    """Each test id's queries (all occluded, in distinct cameras) and gallery images, at least
    one of them in a camera none of its queries uses."""
    rng, all_cams = writer.rng, np.arange(len(writer.cameras))
    for pid in pids:
        ident = Identity.sample(rng)
        q_cams = rng.choice(all_cams, size=queries_per_id, replace=False)
        g_cams = rng.choice(all_cams, size=gallery_per_id, replace=True)
        others = np.setdiff1d(all_cams, q_cams)
        for q in range(min(2, gallery_per_id)):  # every query finds a match in another camera
            g_cams[q] = others[rng.integers(len(others))]
        for cam in q_cams:
            writer.save("query", pid, int(cam), ident, True)
        for cam in g_cams:
            writer.save("gallery", pid, int(cam), ident, rng.random() < gallery_occluded_fraction)


def _write_metadata(root: Path, params: dict, occluded: dict[str, bool]) -> None:
    """The metadata file, written last: its presence says the set is complete."""
    with open(root / SYNTHETIC_META, "w") as f:
        json.dump(
            {
                "generator": "sureid.data.synthetic.make_synthetic_reid",
                "description": "synthetic occluded ReID set; see docs/datasets.md",
                "params": params,
                "occluded": occluded,
            },
            f,
            indent=0,
        )
