"""SureidImageProcessor: inputs of every accepted kind, modes, normalisation, errors, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from sureid import SureidError, SureidImageProcessor, SureidStudentConfig, SureidStudentModel

from .conftest import TINY

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]  # ImageNet's, written out by hand
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture
def processor():
    return SureidImageProcessor.from_model_config(
        SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))
    )


def test_every_input_kind_becomes_a_normalised_batch(processor, tmp_path):
    rgb = Image.new("RGB", (40, 90), (200, 100, 50))
    path = tmp_path / "crop.png"
    rgb.save(path)
    inputs = [
        rgb,
        rgb.convert("L"),
        rgb.convert("RGBA"),
        rgb.convert("P"),
        np.array(rgb),
        np.array(rgb.convert("L")),
        torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1),
        path,
        str(path),
    ]
    out = processor(inputs)["pixel_values"]
    assert out.shape == (len(inputs), 3, 64, 32) and out.dtype == torch.float32
    colour = torch.tensor([200, 100, 50])[:, None, None] / 255.0
    expected = ((colour - MEAN) / STD).expand(3, 64, 32)
    for i in (0, 2, 4, 6, 7, 8):
        torch.testing.assert_close(out[i], expected, atol=2e-2, rtol=0)
    # palette images are expanded through their palette (PIL dithers RGB -> P, so compare to that)
    torch.testing.assert_close(out[3], processor(inputs[3].convert("RGB"))["pixel_values"][0])
    gray = np.asarray(rgb.convert("L"))[0, 0] / 255.0
    for i in (1, 5):  # grayscale becomes three equal channels
        torch.testing.assert_close(
            out[i],
            ((torch.full((3, 1, 1), gray) - MEAN) / STD).expand(3, 64, 32),
            atol=2e-2,
            rtol=0,
        )


def test_single_image_and_4d_batch(processor):
    image = np.random.default_rng(0).integers(0, 255, (100, 50, 3), dtype=np.uint8)
    assert processor(image)["pixel_values"].shape == (1, 3, 64, 32)
    batch = torch.randint(0, 255, (5, 3, 100, 50), dtype=torch.uint8)
    assert processor(batch)["pixel_values"].shape == (5, 3, 64, 32)


def test_resize_is_bicubic(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8))
    out = processor(image)["pixel_values"][0]
    reference = np.asarray(image.resize((32, 64), Image.BICUBIC), dtype=np.float32) / 255.0
    reference = (torch.from_numpy(reference).permute(2, 0, 1) - MEAN) / STD
    # torchvision's antialiased bicubic and PIL's agree to within rounding of 8-bit values
    assert (out - reference).abs().mean() < 0.02


def test_the_eval_collator_gives_the_processors_pixels():
    """Training-time evaluation (data.build_eval_collator) and inference (the processor) are two
    paths; they must feed the model the same pixels, also with a config's own mean and std."""
    from sureid.data import build_eval_collator

    rng = np.random.default_rng(0)
    config = SureidStudentConfig(
        **TINY, sparsify_layers=(1, 3, 5), image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4)
    )
    processor = SureidImageProcessor.from_model_config(config)
    collate = build_eval_collator(
        tuple(config.image_size), mean=config.image_mean, std=config.image_std
    )
    for height, width in ((90, 40), (64, 32), (300, 100)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for picture in (image, image.convert("L"), image.convert("RGBA")):
            ours = collate([{"image": picture, "pid": 0, "camid": 0}])["pixel_values"]
            torch.testing.assert_close(ours, processor(picture)["pixel_values"], atol=1e-6, rtol=0)


def test_errors_name_the_input(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        processor(tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(SureidError, match="corrupt.jpg"):
        processor([corrupt])
    with pytest.raises(SureidError, match="int"):
        processor([3])
    with pytest.raises(SureidError, match="dict"):
        processor({"image": 1})
    with pytest.raises(SureidError, match="empty"):
        processor([])


def test_saved_with_the_model_and_found_by_auto_image_processor(tmp_path):
    config = SureidStudentConfig(
        **TINY, sparsify_layers=(1, 3, 5), image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25)
    )
    SureidStudentModel(config).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SureidImageProcessor)
    assert loaded.size.height == 64 and loaded.size.width == 32
    assert list(loaded.image_mean) == [0.5, 0.5, 0.5]
    white = loaded(Image.new("RGB", (10, 20), (255, 255, 255)))["pixel_values"]
    torch.testing.assert_close(white, torch.full((1, 3, 64, 32), 2.0))
