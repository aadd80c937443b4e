"""SureidImageProcessor: person crops to normalised [B, 3, H, W] tensors at the model's size.

Built on transformers' torchvision image-processor backend (bicubic resize to the config's
image_size, RGB conversion of grayscale / RGBA / palette images, rescale, normalise), plus what a
ReID user feeds in practice: file paths, with errors that name the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling

from .configuration_sureid import IMAGENET_MEAN, IMAGENET_STD, SureidConfig, SureidError

_ACCEPTED = "PIL images, numpy arrays (HxW or HxWxC), torch tensors (CxHxW), or image file paths"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with an error naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SureidError(
            f"cannot read {path} as an image ({err}); is the file corrupt or not an image?"
        ) from err


def to_supported(image):
    """One input to something the backend takes (PIL / ndarray / tensor), RGB where needed.

    Shared with ``sureid.inference`` (which loads inputs one by one in its DataLoader workers).
    """
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray | torch.Tensor):
        if image.ndim not in (2, 3):
            raise SureidError(
                f"an image array must have 2 (HxW) or 3 dimensions, got shape {tuple(image.shape)}"
            )
        if isinstance(image, np.ndarray) and not image.flags.writeable:
            image = image.copy()  # e.g. np.asarray(pil_image); torch wants writable memory
        if image.ndim == 2:  # grayscale -> 3 channels
            image = image[None] if isinstance(image, torch.Tensor) else image[..., None]
            image = (
                image.repeat(3, 0) if isinstance(image, torch.Tensor) else np.repeat(image, 3, -1)
            )
        return image
    raise SureidError(f"cannot process an input of type {type(image).__name__}; pass {_ACCEPTED}")


# The old private name, still imported by inference.py; remove once it imports to_supported.
_to_supported = to_supported


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
        images = [to_supported(image) for image in images]
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, *args, **kwargs)
