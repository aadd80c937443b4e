"""Kept-token overlays (masks checked pixel by pixel), CMC curve, ranked lists, `sureid visualize`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sureid import SureidError, SureidStudentConfig
from sureid.cli import main
from sureid.inference import extract_features
from sureid.visualize import (
    CORRECT_COLOR,
    KEPT_LAYOUT,
    MASK_COLOR,
    WRONG_COLOR,
    kept_token_mask,
    overlay_kept_tokens,
    plot_cmc,
    plot_kept_tokens,
    plot_ranked_results,
)

from .conftest import TINY

pytest.importorskip("matplotlib", reason="the viz extra: pip install sureid[viz]")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def crops():
    # colours well below white (no bicubic overshoot reaches 255), so white means "masked"
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 150, (64, 32, 3), dtype=np.uint8)) for _ in range(3)]


def _config(**overrides):
    return SureidStudentConfig(**{**TINY, **overrides}, sparsify_layers=(1, 3, 5))


def test_mask_maps_grid_cells_to_pixel_boxes():
    config = _config()  # 64x32, patch 8, stride 8: a 8x4 grid
    mask = kept_token_mask([0, 5, 31], config)
    expected = np.zeros((64, 32), bool)
    expected[0:8, 0:8] = True  # cell 0 = (0, 0)
    expected[8:16, 8:16] = True  # cell 5 = (1, 1)
    expected[56:64, 24:32] = True  # cell 31 = (7, 3)
    assert np.array_equal(mask, expected)
    with pytest.raises(SureidError, match="0..31"):
        kept_token_mask([32], config)


def test_mask_with_overlapping_patches_and_an_uncovered_margin():
    config = _config(stride_size=6)  # grid (64-8)//6+1 = 10 rows, (32-8)//6+1 = 5 cols
    assert config.grid_size == (10, 5)
    mask = kept_token_mask([0, 1], config)  # cells (0,0) and (0,1): cols 0..7 and 6..13
    expected = np.zeros((64, 32), bool)
    expected[0:8, 0:14] = True
    assert np.array_equal(mask, expected)
    # every patch kept: the bottom rows 62, 63 are seen by no patch and stay masked
    full = kept_token_mask(range(50), config)
    assert full[:62].all() and not full[62:].any()


def test_overlay_paints_exactly_the_dropped_pixels():
    image = np.random.default_rng(0).integers(0, 200, (64, 32, 3), dtype=np.uint8)
    mask = kept_token_mask([3, 4, 10], _config())
    out = overlay_kept_tokens(image, mask)
    assert np.array_equal(out[mask], image[mask])
    assert (out[~mask] == MASK_COLOR).all()
    assert out is not image and not (image[~mask] == MASK_COLOR).all()


def _png(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def test_kept_token_grid_masks_the_dropped_patches(student, crops, tmp_path):
    dpi = 100
    out = plot_kept_tokens(student, crops, tmp_path / "kept.png", titles=["a", "b", "c"], dpi=dpi)
    png = _png(out)
    left, top, (gx, gy), margin = (KEPT_LAYOUT[k] for k in ("left", "title", "gap", "margin"))
    cw, ch = 1.0, 2.0  # cell_width 1 inch, 64x32 images
    rows, cols = 4, 3  # input + three stages, three images
    width = left + cols * cw + (cols - 1) * gx + margin
    height = top + rows * ch + (rows - 1) * gy + margin
    assert png.shape[:2] == (round(height * dpi), round(width * dpi))
    kept = extract_features(student, crops, return_kept=True).kept_indices
    grid_rows, grid_cols = student.config.grid_size
    white = np.array(MASK_COLOR)
    for col in range(cols):
        for row in range(rows):
            x0, y0 = (left + col * (cw + gx)) * dpi, (top + row * (ch + gy)) * dpi
            kept_cells = set(range(32)) if row == 0 else set(kept[row - 1][col].tolist())
            for cell in range(grid_rows * grid_cols):
                r, c = divmod(cell, grid_cols)
                # centre of the cell's 8x8 box, in PNG pixels
                y = int(y0 + (r * 8 + 4) / 64 * ch * dpi)
                x = int(x0 + (c * 8 + 4) / 32 * cw * dpi)
                is_white = (png[y, x] == white).all()
                assert is_white == (cell not in kept_cells), (row, col, cell)


def test_a_teacher_has_no_kept_tokens_to_draw(crops, tmp_path):
    from sureid import SureidTeacherConfig, SureidTeacherModel

    teacher = SureidTeacherModel(SureidTeacherConfig(**TINY))
    with pytest.raises(SureidError, match="HTS student"):
        plot_kept_tokens(teacher, crops, tmp_path / "x.png")


def test_cmc_curve_png(tmp_path):
    out = plot_cmc(
        {"plain": [0.2, 0.5, 0.8, 1.0], "re-ranked": [0.4, 0.7, 0.9, 1.0]}, tmp_path / "cmc.png"
    )
    png = _png(out)
    assert png.shape[:2] == (320, 420)  # 4.2 x 3.2 inches at 100 dpi
    assert png.std() > 10  # something was drawn


def test_ranked_results_have_green_and_red_frames(crops, tmp_path):
    out = plot_ranked_results(
        crops[:2],
        crops,
        torch.tensor([[0, 1], [2, 1]]),
        tmp_path / "ranked.png",
        query_pids=[7, 8],
        gallery_pids=[7, 9, 9],
        scores=torch.tensor([[0.9, 0.5], [0.8, 0.7]]),
    )
    png = _png(out)
    assert png.shape[0] > png.shape[1] / 2  # two rows of tall crops, three columns
    count = lambda color: int((png == np.array(color)).all(-1).sum())  # noqa: E731
    assert count(CORRECT_COLOR) > 100 and count(WRONG_COLOR) > 3 * count(CORRECT_COLOR) / 2
    png = _png(plot_ranked_results(crops[:1], crops, [[0, 1]], tmp_path / "plain.png"))
    assert count(CORRECT_COLOR) == 0 and count(WRONG_COLOR) == 0  # no pids: gray frames
    with pytest.raises(ValueError, match="rows"):
        plot_ranked_results(crops[:2], crops, [[0, 1]], tmp_path / "bad.png")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install sureid\[viz\]"):
        plot_cmc([0.5, 1.0], tmp_path / "cmc.png")


@pytest.mark.slow
def test_cli_visualize_writes_the_pictures(student, crops, tmp_path, capsys):
    from sureid.data import make_synthetic_reid

    model_dir = tmp_path / "model"
    student.save_pretrained(model_dir)
    root = make_synthetic_reid(
        tmp_path / "synthetic", num_train_ids=2, num_test_ids=3, size=(64, 32),
        images_per_train_id=2, queries_per_id=1, gallery_per_id=2, num_cameras=2,
    )  # fmt: skip
    images = sorted(str(p) for p in (root / "query").iterdir())
    out = tmp_path / "pictures"
    code = main(
        ["visualize", "--model", str(model_dir), "--images", *images, "--dataset", "synthetic",
         "--root", str(root), "--out", str(out), "--top-k", "3", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("kept_tokens.png", "cmc.png", "ranked.png"):
        assert f"wrote {out / name}" in printed
    # The command draws what the library draws for the same checkpoint, pixel for pixel.
    from sureid import SureidModel, evaluate_model
    from sureid.data import load_reid_dataset

    model = SureidModel.from_pretrained(model_dir)
    titles = [Path(p).name for p in images]
    reference = plot_kept_tokens(model, images, tmp_path / "kept.png", "all", titles)
    assert np.array_equal(_png(out / "kept_tokens.png"), _png(reference))
    data = load_reid_dataset("synthetic", root)
    metrics = evaluate_model(
        model, data["query"], data["gallery"], "market", device="cpu", progress=False
    ).metrics
    reference = plot_cmc(metrics, tmp_path / "cmc.png", max_rank=20, title="CMC (synthetic)")
    assert np.array_equal(_png(out / "cmc.png"), _png(reference))
