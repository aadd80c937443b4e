"""SureidReIDEncoder: boxes in frames -> embeddings, equal to extract_features of the crops."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sureid import SureidError, SureidReIDEncoder, extract_features
from sureid.encoder import as_boxes, crop_boxes


@pytest.fixture(scope="module")
def encoder(model_dir):
    return SureidReIDEncoder.from_pretrained(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A 120x160 RGB frame of noise with two coloured 'people'."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    image[10:90, 20:50] = (200, 30, 30)
    image[30:110, 100:140] = (30, 30, 200)
    return image


BOXES = np.array(
    [
        [20.0, 10.0, 50.0, 90.0],  # integer corners
        [99.6, 29.2, 140.4, 110.0],  # fractional corners: floor / ceil
        [-15.0, -8.0, 40.0, 60.0],  # partly outside: clipped
        [130.0, 70.0, 175.0, 130.0],  # partly outside on the other side
    ]
)


def _saved_crops(frame, boxes, folder) -> list[str]:
    """The encoder's crops saved as PNG (lossless), as a user would cut them by hand."""
    paths = []
    for i, crop in enumerate(crop_boxes(frame, boxes)):
        path = folder / f"crop{i}.png"
        Image.fromarray(crop).save(path)
        paths.append(str(path))
    return paths


def test_box_features_equal_extract_features_of_the_saved_crops(encoder, frame, tmp_path):
    features = encoder.encode(frame, BOXES)
    assert features.dtype == np.float32 and features.shape == (4, encoder.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    reference = extract_features(
        encoder.model, _saved_crops(frame, BOXES, tmp_path), device="cpu", progress=False
    ).numpy()
    assert np.abs(features - reference).max() < 1e-5


def test_crops_are_the_pixels_the_box_touches_clipped_to_the_frame(frame):
    crops = crop_boxes(frame, BOXES)
    np.testing.assert_array_equal(crops[0], frame[10:90, 20:50])
    np.testing.assert_array_equal(crops[1], frame[29:110, 99:141])
    np.testing.assert_array_equal(crops[2], frame[0:60, 0:40])
    np.testing.assert_array_equal(crops[3], frame[70:120, 130:160])


def test_bgr_frames_give_the_rgb_features(encoder, frame):
    rgb = encoder.encode(frame, BOXES, color="rgb")
    bgr = encoder.encode(np.ascontiguousarray(frame[..., ::-1]), BOXES, color="bgr")
    np.testing.assert_array_equal(rgb, bgr)
    # the wrong colour order gives other features: the option is not ignored
    assert np.abs(encoder.encode(frame, BOXES, color="bgr") - rgb).max() > 1e-3


def test_pil_frames_and_torch_boxes(encoder, frame):
    expected = encoder.encode(frame, BOXES)
    got = encoder.encode(Image.fromarray(frame), torch.from_numpy(BOXES).float())
    assert np.abs(got - expected).max() < 1e-5
    with pytest.raises(SureidError, match="PIL image.*RGB"):
        encoder.encode(Image.fromarray(frame), BOXES, color="bgr")


def test_several_frames_in_one_call_equal_one_call_per_frame(encoder, frame):
    second = np.ascontiguousarray(frame[::-1])
    boxes = [BOXES, BOXES[:1], np.zeros((0, 4)), BOXES[1:]]
    frames = [frame, second, frame, second]
    together = encoder.encode_frames(frames, boxes)
    assert [len(x) for x in together] == [4, 1, 0, 3]
    for got, image, frame_boxes in zip(together, frames, boxes):
        alone = encoder.encode(image, frame_boxes)
        assert got.shape == alone.shape
        if len(alone):
            assert np.abs(got - alone).max() < 1e-5


def test_batch_size_caps_the_forward_and_changes_nothing(model_dir, frame):
    small = SureidReIDEncoder(str(model_dir), device="cpu", batch_size=3)
    calls = []
    small.model.register_forward_hook(
        lambda _m, _args, kwargs, _o: calls.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    boxes = np.tile(BOXES, (2, 1))  # 8 boxes -> forwards of 3, 3, 2
    got = small.encode(frame, boxes)
    assert calls == [3, 3, 2]
    full = SureidReIDEncoder(small.model, device="cpu").encode(frame, boxes)
    assert np.abs(got - full).max() < 1e-5


def test_empty_box_lists(encoder, frame):
    for empty in (np.zeros((0, 4)), [], torch.zeros(0, 4)):
        out = encoder.encode(frame, empty)
        assert out.shape == (0, encoder.embedding_dim) and out.dtype == np.float32
    assert encoder.encode_frames([], []) == []
    out = encoder.encode(frame, [], return_tensors="pt")
    assert isinstance(out, torch.Tensor) and out.shape == (0, encoder.embedding_dim)


DEGENERATE = np.array(
    [
        [200.0, 10.0, 260.0, 90.0],  # entirely right of the frame
        [-60.0, -90.0, -10.0, -5.0],  # entirely above-left
        [30.0, 40.0, 30.0, 80.0],  # zero width
        [30.0, 40.0, 60.0, 40.0],  # zero height
        [159.9, 119.9, 160.0, 120.0],  # a sliver at the corner: one pixel
        [20.0, 10.0, 50.0, 90.0],  # a normal box among them
    ]
)


def test_degenerate_boxes_give_zero_rows_never_nan(model_dir, frame, caplog):
    encoder = SureidReIDEncoder(str(model_dir), device="cpu")
    with caplog.at_level(logging.WARNING, logger="sureid"):
        out = encoder.encode(frame, DEGENERATE)
        encoder.encode(frame, DEGENERATE)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:4], 0.0)
    np.testing.assert_allclose(np.linalg.norm(out[4:], axis=1), 1.0, atol=1e-5)
    assert encoder.empty_boxes == 8
    said = [r for r in caplog.records if "no area inside the frame" in r.getMessage()]
    assert len(said) == 1  # once per encoder, not once per frame


def test_degenerate_boxes_can_raise(model_dir, frame):
    encoder = SureidReIDEncoder(str(model_dir), device="cpu", on_empty="raise")
    with pytest.raises(SureidError, match=r"box 0 of the frame .*160x120.*on_empty='zeros'"):
        encoder.encode(frame, DEGENERATE)
    with pytest.raises(SureidError, match="box 2 of frame 1"):
        encoder.encode_frames([frame, frame], [DEGENERATE[5:], DEGENERATE[[5, 5, 3]]])


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ([[0, 0, np.nan, 10]], "box 0 of the frame has a NaN"),
        ([[0, 0, 10, 10], [0, 0, np.inf, 10]], "box 1 of the frame has a NaN or infinite"),
        ([[50, 20, 30, 60]], r"x2 < x1 or y2 < y1.*x2 = x \+ w"),
        ([[1, 2, 3]], r"shape \(1, 3\).*\[N, 4\]"),
        ([[1, 2, 3, 4, 0.9, 0]], r"shape \(1, 6\).*first 4 columns"),
    ],
)
def test_bad_boxes_raise_naming_the_box(encoder, frame, boxes, message):
    with pytest.raises(SureidError, match=message):
        encoder.encode(frame, np.array(boxes, dtype=float))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((20, 20), np.uint8), "shape"),
        (np.zeros((20, 20, 4), np.uint8), "HxWx3 uint8"),
        (np.zeros((20, 20, 3), np.float32), "dtype float32"),
        (torch.zeros(3, 20, 20, dtype=torch.uint8), "is a Tensor"),
    ],
)
def test_bad_frames_raise(encoder, bad, message):
    with pytest.raises(SureidError, match=message):
        encoder.encode(bad, [[0, 0, 5, 5]])


def test_bad_arguments(encoder, frame, model_dir):
    with pytest.raises(ValueError, match="color"):
        encoder.encode(frame, BOXES, color="rgba")
    with pytest.raises(ValueError, match="return_tensors"):
        encoder.encode(frame, BOXES, return_tensors="tf")
    with pytest.raises(SureidError, match="2 frames but 1 box lists"):
        encoder.encode_frames([frame, frame], [BOXES])
    with pytest.raises(ValueError, match="batch_size"):
        SureidReIDEncoder(str(model_dir), batch_size=0)
    with pytest.raises(ValueError, match="on_empty"):
        SureidReIDEncoder(str(model_dir), on_empty="skip")


def test_get_features_is_boxmot_protocol_on_bgr_frames(encoder, frame):
    bgr = np.ascontiguousarray(frame[..., ::-1])
    got = encoder.get_features(BOXES.astype(np.float32), bgr)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, encoder.encode(frame, BOXES))
    # BoxMOT rejects zero embeddings, so a box with no area is an error here, with the fix
    with pytest.raises(SureidError, match="drop boxes with no area before the tracker"):
        encoder.get_features(DEGENERATE, bgr)


def test_as_boxes_accepts_lists_and_any_tensor_dtype(frame):
    assert as_boxes([[1, 2, 3, 4]]).shape == (1, 4)
    assert as_boxes([]).shape == (0, 4)
    for dtype in (torch.bfloat16, torch.float16, torch.int64):
        got = as_boxes(torch.tensor([[1, 2, 30, 40]], dtype=dtype))
        assert got.tolist() == [[1.0, 2.0, 30.0, 40.0]]


def test_runs_in_inference_mode_and_keeps_eval(encoder, frame):
    encoder.model.train()  # a caller's stray .train() between frames
    seen = []
    hook = encoder.model.register_forward_hook(
        lambda m, _a, _o: seen.append((torch.is_inference_mode_enabled(), m.training))
    )
    try:
        encoder.encode(frame, BOXES[:1])
    finally:
        hook.remove()
        encoder.model.eval()
    # inference mode always; the model is put back in eval mode (true token dropping) each call
    assert seen == [(True, False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_a_gpu_matches_float32(model_dir, frame, dtype):
    exact = SureidReIDEncoder(str(model_dir), device="cpu").encode(frame, BOXES)
    half = SureidReIDEncoder(str(model_dir), device="cuda", dtype=dtype).encode(frame, BOXES)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    assert (half * exact).sum(axis=1).min() > 0.99  # cosine similarity to the float32 features
