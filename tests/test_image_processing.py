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


@pytest.mark.parametrize(
    "empty, named",
    [
        (
            Image.new("RGB", (40, 90)).crop((5, 5, 5, 20)),
            r"PIL image 0x15 RGB is empty \(height 15, width 0",
        ),
        (
            np.zeros((0, 10, 3), np.uint8),
            r"ndarray of shape \(0, 10, 3\) is empty \(height 0, width 10",
        ),
        (
            torch.zeros(3, 7, 0, dtype=torch.uint8),
            r"Tensor of shape \(3, 7, 0\) is empty \(height 7, width 0",
        ),
    ],
)
def test_an_empty_crop_is_named_with_its_size(processor, empty, named):
    """A zero-size crop used to fail deep in torch ("shape '[1, 3, 64, 32]' is invalid for input
    of size 0"); the error names the image and its size, in a batch of good ones too."""
    good = np.zeros((64, 32, 3), np.uint8)
    with pytest.raises(SureidError, match=named + r": no pixels\).*empty crop"):
        processor([good, empty])


def test_an_empty_image_file_is_named_by_its_path(tmp_path, monkeypatch):
    """load_image names the file (no common format stores a 0-pixel image: PIL is made to
    return one here)."""
    from sureid import image_processing_sureid

    path = tmp_path / "crop_0007.png"
    Image.new("RGB", (4, 4)).save(path)
    monkeypatch.setattr(
        image_processing_sureid, "to_rgb", lambda image, what: Image.new("RGB", (0, 9))
    )
    with pytest.raises(SureidError, match=r"crop_0007.png is empty \(height 9, width 0"):
        image_processing_sureid.load_image(path)


def test_tiny_images_are_upscaled_with_one_warning_that_counts_them(processor, tmp_path, caplog):
    """1x1 images used to be upscaled 64x in silence; now one warning per call, however many,
    counting the images under a quarter of the input's height (64) or width (32) and naming
    the first with its size (its path when it came as one)."""
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny)
    big_enough = Image.new("RGB", (8, 16))  # exactly a quarter of 32 wide, 64 high: no warning
    narrow = np.zeros((64, 7, 3), np.uint8)  # under a quarter of the width alone
    with caplog.at_level("WARNING", logger="sureid.image_processing_sureid"):
        out = processor([big_enough, tiny, narrow, Image.new("RGB", (1, 1))] * 5)["pixel_values"]
    assert out.shape == (20, 3, 64, 32)  # still processed
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("15 of 20 images are under a quarter of the model's input")
    assert f"first: {tiny}, height 1, width 1" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="sureid.image_processing_sureid"):
        processor([big_enough, np.zeros((100, 50, 3), np.uint8)])
    assert not caplog.records
