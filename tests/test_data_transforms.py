"""Train / eval transforms and the batch-level random patch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sureid.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomPatch,
    build_eval_transform,
    build_train_transform,
)


def test_eval_transform_resizes_and_normalises() -> None:
    image = Image.new("RGB", (50, 100), (255, 0, 128))
    x = build_eval_transform((64, 32))(image)
    assert x.shape == (3, 64, 32) and x.dtype == torch.float32
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 128 / 255), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3)
    uint8 = torch.full((3, 100, 50), 255, dtype=torch.uint8)
    assert build_eval_transform((64, 32))(uint8).shape == (3, 64, 32)


def test_train_transform_pipeline_and_shape() -> None:
    t = build_train_transform((64, 32))
    kinds = [type(op) for op in t.transforms]
    assert kinds == [
        v2.ToImage,
        v2.Resize,
        v2.RandomHorizontalFlip,
        v2.Pad,
        v2.RandomCrop,
        v2.ToDtype,
        v2.Normalize,
        v2.RandomErasing,
    ]
    assert t.transforms[1].interpolation == v2.InterpolationMode.BICUBIC
    assert t.transforms[3].padding == 2  # 10 at 256x128, scaled to the height
    assert build_train_transform().transforms[3].padding == 10
    assert t.transforms[-1].p == 0.5
    x = t(Image.new("RGB", (40, 90), (10, 20, 30)))
    assert x.shape == (3, 64, 32) and x.dtype == torch.float32
    with_jitter = build_train_transform((64, 32), color_jitter=True)
    assert any(isinstance(op, v2.ColorJitter) for op in with_jitter.transforms)


def test_train_transform_is_deterministic_under_torch_seed() -> None:
    t = build_train_transform((64, 32))
    image = Image.effect_mandelbrot((60, 120), (-2, -1, 1, 1), 50).convert("RGB")
    torch.manual_seed(0)
    a = t(image)
    torch.manual_seed(0)
    b = t(image)
    assert torch.equal(a, b)


def _constant_batch(n: int = 6, h: int = 32, w: int = 16) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()


def test_random_patch_pastes_a_piece_of_another_image() -> None:
    batch = _constant_batch()
    out = RandomPatch(p=1.0)(batch, generator=torch.Generator().manual_seed(0))
    h, w = batch.shape[-2:]
    for i in range(len(batch)):
        values = out[i].unique()
        foreign = [v for v in values.tolist() if v != i]
        assert len(foreign) == 1  # one patch, cut from one other image
        area = (out[i, 0] == foreign[0]).sum().item() / (h * w)
        assert 0.01 * 0.5 <= area <= 0.5 + 0.05  # area range, up to rounding
    assert torch.equal(batch, _constant_batch())  # input untouched


def test_random_patch_probability_and_determinism() -> None:
    batch = _constant_batch()
    assert torch.equal(RandomPatch(p=0.0)(batch), batch)
    single = batch[:1]
    assert torch.equal(RandomPatch(p=1.0)(single), single)
    a = RandomPatch(p=0.5)(batch, generator=torch.Generator().manual_seed(3))
    b = RandomPatch(p=0.5)(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="probability"):
        RandomPatch(p=1.5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        RandomPatch()(batch[0])
