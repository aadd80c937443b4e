"""SureidImageProcessor: person crops to normalised [B, 3, H, W] tensors at the model's size.

Built on transformers' torchvision image-processor backend (bicubic resize to the config's
image_size, RGB conversion of grayscale / RGBA / palette images, rescale, normalise), plus what a
ReID user feeds in practice: file paths, with errors that name the file.

Pixel values are read by the input's type, then rounded to 8 bits (the precision the model
was trained at), so every kind of the same picture gives the same features:

- uint8 arrays / tensors, PIL images: 0..255;
- float arrays / tensors (any float dtype): 0..1, as torchvision's ``ToTensor`` gives them;
  values beyond [-0.01, 1.01] raise (a float image in 0..255, or one already normalised
  with mean / std, would otherwise come out white or wrong); the small excess is clipped;
- uint16 arrays / tensors and 16-bit PIL images (modes ``I;16``, ``I``): 0..65535, divided by
  257 (the full 16-bit range maps to 0..255; an image is not stretched by its own range, so
  12-bit data stored in 16 bits comes out dark: multiply it by 16 first);
- other integer arrays: 0..255 (values outside raise); bool arrays raise.

An image without pixels (an empty crop) raises, naming the image and its size. Images much
smaller than the model's input (under a quarter of its height or width) are upscaled as asked,
with one logged warning per call that counts them and names the first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling

from .configuration_sureid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SureidConfig,
    SureidError,
    SureidStudentConfig,
    SureidTeacherConfig,
)

logger = logging.getLogger(__name__)

_ACCEPTED = "PIL images, numpy arrays (HxW or HxWxC), torch tensors (CxHxW), or image file paths"


# Float pixels may stray this far beyond [0, 1] (resampling overshoot) before it is an error.
_FLOAT_TOLERANCE = 0.01
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# An image under this fraction of the model's input height or width is warned about.
SMALL_IMAGE_FRACTION = 0.25


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with an error naming the file when it is missing or unreadable.

    16-bit files (``I;16`` PNGs) are scaled to 8 bits by 65535 -> 255 (see the module doc).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            image = to_rgb(image, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SureidError(
            f"cannot read {path} as an image ({err}); is the file corrupt or not an image?"
        ) from err
    check_not_empty(image, str(path))
    return image


def to_rgb(image: Image.Image, what: str = "the image") -> Image.Image:
    """A PIL image as 8-bit RGB; 16-bit (``I;16``, ``I``) and float (``F``) modes are scaled.

    ``Image.convert("RGB")`` alone clips 16-bit values at 255, so nearly every pixel of a
    16-bit image would come out white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise SureidError(
                f"{what}: a mode {image.mode} image with values in [{array.min()}, "
                f"{array.max()}]; 16-bit images must lie in 0..65535"
            )
        image = Image.fromarray(to_uint8(array.astype(np.uint16), what))
    elif image.mode == "F":
        image = Image.fromarray(to_uint8(np.asarray(image), what))
    return image if image.mode == "RGB" else image.convert("RGB")


def image_height_width(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an HxW / HxWxC (or CxHxW) array or a CxHxW tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    channels = (1, 3, 4)
    # tensors are CxHxW unless plainly HxWxC; arrays HxWxC unless plainly CxHxW (as the backend)
    if isinstance(image, torch.Tensor):
        hwc = shape[-1] in channels and shape[0] not in channels
    else:
        hwc = not (shape[0] in channels and shape[-1] not in channels)
    return (shape[0], shape[1]) if hwc else (shape[1], shape[2])


def check_not_empty(image, what: str) -> None:
    """Raise ``SureidError`` naming ``what`` and its size when ``image`` has no pixels."""
    if isinstance(image, Image.Image):
        empty = image.width == 0 or image.height == 0
    else:
        empty = image.numel() == 0 if isinstance(image, torch.Tensor) else image.size == 0
    if empty:
        height, width = image_height_width(image)
        raise SureidError(
            f"{what} is empty (height {height}, width {width}: no pixels), so there is nothing "
            "to resize; an empty crop? Check the box it was cut with, or leave it out"
        )


def _pixel_kind(dtype) -> str:
    """uint8, uint16, int (other integers), float, bool or other, for numpy and torch dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.uint8, torch.uint16, torch.bool):
            return str(dtype).removeprefix("torch.")
        if dtype.is_floating_point:
            return "float"
        return "other" if dtype.is_complex else "int"
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize in (1, 2):
        return f"uint{8 * dtype.itemsize}"
    return {"b": "bool", "f": "float", "i": "int", "u": "int"}.get(dtype.kind, "other")


def to_uint8(image: np.ndarray | torch.Tensor, what: str = "the image"):
    """An image array / tensor as uint8 0..255, reading its values by dtype (module doc).

    Same type, shape and device as given. Raises ``SureidError`` naming the input when the
    values do not fit their dtype's range (e.g. a float image in 0..255).
    """
    kind = _pixel_kind(image.dtype)
    if kind == "uint8":
        return image
    name = str(image.dtype).removeprefix("torch.")
    if kind in ("bool", "other"):
        raise SureidError(f"{what} has dtype {name}; pass uint8 (0..255) or float (0..1) pixels")
    is_torch = isinstance(image, torch.Tensor)
    # float32 for tensors: exact for every 8- and 16-bit value, and MPS has no float64
    x = image.detach().to(torch.float32) if is_torch else np.asarray(image, dtype=np.float64)
    empty = x.numel() == 0 if is_torch else x.size == 0
    low, high = (0.0, 0.0) if empty else (float(x.min()), float(x.max()))
    if kind == "float":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise SureidError(f"{what} ({name}) contains NaN or infinite values")
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise SureidError(
                f"{what} is {name} with values in [{low:.4g}, {high:.4g}]; float images must "
                "lie in [0, 1] (torchvision's convention): divide 0..255 values by 255 or pass "
                "uint8, and pass pixels before any mean/std normalisation"
            )
        scale = 255.0
    elif kind == "uint16":
        scale = 255.0 / 65535.0
    elif low < 0 or high > 255:
        raise SureidError(
            f"{what} is {name} with values in [{low:.0f}, {high:.0f}]; integer images other "
            "than uint16 are read as 0..255: pass uint8 (0..255), uint16 (0..65535) or float "
            "(0..1) pixels"
        )
    else:
        scale = 1.0
    x = (x * scale).clip(0, 255).round()
    return x.to(torch.uint8) if is_torch else x.astype(np.uint8)


def to_supported(image):
    """One input to something the backend takes (PIL / ndarray / tensor), RGB where needed.

    Shared with ``sureid.inference`` (which loads inputs one by one in its DataLoader workers).
    """
    if isinstance(image, str | os.PathLike):
        return load_image(image)  # checked there, naming the file
    if isinstance(image, Image.Image):
        check_not_empty(image, _what(image))
        return to_rgb(image, _what(image))
    if isinstance(image, np.ndarray | torch.Tensor):
        if image.ndim not in (2, 3):
            raise SureidError(
                f"an image array must have 2 (HxW) or 3 dimensions, got shape {tuple(image.shape)}"
            )
        check_not_empty(image, _what(image))
        image = to_uint8(image, _what(image))
        if isinstance(image, np.ndarray) and not image.flags.writeable:
            image = image.copy()  # e.g. np.asarray(pil_image); torch wants writable memory
        if image.ndim == 2:  # grayscale -> 3 channels
            image = image[None] if isinstance(image, torch.Tensor) else image[..., None]
            image = (
                image.repeat(3, 0) if isinstance(image, torch.Tensor) else np.repeat(image, 3, -1)
            )
        return image
    raise SureidError(f"cannot process an input of type {type(image).__name__}; pass {_ACCEPTED}")


def _what(image) -> str:
    """How messages name an in-memory input (as extract_features lists skipped inputs)."""
    if isinstance(image, Image.Image):
        return f"PIL image {image.size[0]}x{image.size[1]} {image.mode}"
    return f"{type(image).__name__} of shape {tuple(image.shape)}"


def as_image_list(images, action: str = "process", also: str = "") -> list:
    """One image, a list of images, or a 4-D batch array / tensor -> a list of single images.

    Anything else raises ``SureidError``: ``cannot {action} a {type}``, what is accepted, ``also``.
    """
    if isinstance(images, str | os.PathLike | Image.Image) or (
        isinstance(images, np.ndarray | torch.Tensor) and images.ndim in (2, 3)
    ):
        return [images]
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
        return list(images)
    if not isinstance(images, Sequence) or isinstance(images, bytes):
        raise SureidError(f"cannot {action} a {type(images).__name__}; pass {_ACCEPTED}{also}")
    return list(images)


class SureidImageProcessor(TorchvisionBackend):
    """Resize (bicubic) to the model's image_size, convert to RGB, rescale to [0, 1], normalise.

    ``processor(images, return_tensors="pt")["pixel_values"]`` -> float32 [B, 3, H, W].
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = list(IMAGENET_MEAN)
    image_std = list(IMAGENET_STD)
    size = {"height": 256, "width": 128}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def from_model_config(cls, config: SureidConfig) -> SureidImageProcessor:
        """The processor that matches a model config's image_size, mean and std."""
        height, width = config.image_size
        return cls(
            size={"height": height, "width": width},
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )

    def preprocess(self, images, *args, **kwargs):
        images = as_image_list(images)
        if len(images) == 0:
            raise SureidError("no images to process (an empty list was given)")
        sources = images
        images = [to_supported(image) for image in images]
        self._warn_small(sources, images, kwargs.get("size"))
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, *args, **kwargs)

    def _warn_small(self, sources: list, images: list, size=None) -> None:
        """One warning for the images of this call under a quarter of the model's input height
        or width (a detector's stray box, a thumbnail?): it counts them and names the first (its
        path when it has one), however many there are."""
        size = size if size is not None else self.size
        try:
            height, width = int(size["height"]), int(size["width"])
        except (KeyError, TypeError):  # a size given another way (e.g. shortest_edge)
            return
        small = []
        for source, image in zip(sources, images):
            h, w = image_height_width(image)
            if h < SMALL_IMAGE_FRACTION * height or w < SMALL_IMAGE_FRACTION * width:
                small.append((source, h, w))
        if not small:
            return
        source, h, w = small[0]
        name = str(source) if isinstance(source, str | os.PathLike) else _what(source)
        logger.warning(
            "%d of %d images are under a quarter of the model's input (height %d, width %d) in "
            "height or width: upscaled from that few pixels, they carry little of a person "
            "(first: %s, height %d, width %d); check the crops",
            len(small),
            len(images),
            height,
            width,
            name,
            h,
            w,
        )


# Known to transformers' AutoImageProcessor for both checkpoint kinds.
for _config_cls in (SureidTeacherConfig, SureidStudentConfig):
    AutoImageProcessor.register(
        _config_cls, fast_image_processor_class=SureidImageProcessor, exist_ok=True
    )
