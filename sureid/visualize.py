"""Pictures: kept-token overlays (the paper's Fig. 6), CMC curves, ranked-result grids.

matplotlib is an optional extra (``pip install sureid[viz]``), imported when a plot is drawn.
Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
pyplot, so nothing here changes the caller's matplotlib backend or opens a window.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .configuration_sureid import SureidConfig, SureidError

MASK_COLOR = (255, 255, 255)  # dropped patches are painted white, as in DynamicViT's figures
CORRECT_COLOR = (0, 170, 0)
WRONG_COLOR = (220, 0, 0)
QUERY_COLOR = (40, 90, 200)
# Layout of plot_kept_tokens in inches: room for the row labels, the titles (or none), the gaps
# between cells, and the margin right and below.
KEPT_LAYOUT = {"left": 0.22, "top": 0.05, "title": 0.22, "gap": (0.05, 0.08), "margin": 0.05}


def _figure(**kwargs):
    """A new matplotlib Figure on the Agg canvas; a clear error when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "sureid.visualize needs matplotlib: pip install sureid[viz]  (or: pip install "
            "matplotlib)"
        ) from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _grid_axes(
    n_rows: int,
    n_cols: int,
    cell: tuple[float, float],
    *,
    left: float,
    top: float,
    gap: tuple[float, float],
):
    """A figure with an exact grid of image axes (inches): returns (fig, axes[row][col])."""
    cw, ch = cell
    gx, gy = gap
    margin = KEPT_LAYOUT["margin"]
    width = left + n_cols * cw + (n_cols - 1) * gx + margin
    height = top + n_rows * ch + (n_rows - 1) * gy + margin
    fig = _figure(figsize=(width, height))
    axes = []
    for r in range(n_rows):
        row = []
        y = height - top - (r + 1) * ch - r * gy
        for c in range(n_cols):
            x = left + c * (cw + gx)
            ax = fig.add_axes((x / width, y / height, cw / width, ch / height))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("0.6")
                spine.set_linewidth(0.5)
            row.append(ax)
        axes.append(row)
    return fig, axes


def _save(fig, out: str | os.PathLike, dpi: int) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor="white")
    return out


# --------------------------------------------------------------------------------------------
# Kept-token overlays
# --------------------------------------------------------------------------------------------


def kept_token_mask(kept: torch.Tensor | np.ndarray | Sequence[int], config: SureidConfig):
    """Boolean [H, W] mask at the model's input size: True where a kept patch covers the pixel.

    Grid cell ``i`` (row-major over ``config.grid_size``) covers the pixel box rows
    ``[r*s, r*s+p)``, columns ``[c*s, c*s+p)`` (``p`` patch size, ``s`` stride). With
    overlapping patches (``s < p``) a pixel is kept when any kept patch covers it; pixels no
    patch covers (a right / bottom margin when the stride does not tile the image) are never
    seen by the model and count as dropped.
    """
    rows, cols = config.grid_size
    h, w = config.image_size
    p, s = config.patch_size, config.stride_size
    kept = np.asarray(torch.as_tensor(kept).cpu()).reshape(-1)
    if kept.size and (kept.min() < 0 or kept.max() >= rows * cols):
        raise SureidError(
            f"kept indices must be in 0..{rows * cols - 1} for the {rows}x{cols} patch grid, "
            f"got {kept.min()}..{kept.max()}; do they come from a model with this config?"
        )
    mask = np.zeros((h, w), dtype=bool)
    for i in kept.tolist():
        r, c = divmod(int(i), cols)
        mask[r * s : r * s + p, c * s : c * s + p] = True
    return mask


def overlay_kept_tokens(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = MASK_COLOR
) -> np.ndarray:
    """A copy of ``image`` (uint8 [H, W, 3]) with the pixels outside ``mask`` painted ``color``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} sizes differ")
    out = image.copy()
    out[~mask] = np.asarray(color, dtype=out.dtype)
    return out


def denormalize(pixel_values: torch.Tensor, config: SureidConfig) -> np.ndarray:
    """Processor output [B, 3, H, W] back to uint8 images [B, H, W, 3] (what the model saw)."""
    mean = torch.tensor(config.image_mean)[:, None, None]
    std = torch.tensor(config.image_std)[:, None, None]
    x = pixel_values.detach().float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def plot_kept_tokens(
    model,
    images: Sequence[Any],
    out: str | os.PathLike,
    stages: str = "all",
    titles: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dpi: int = 100,
    cell_width: float = 1.0,
) -> Path:
    """Save a PNG grid: one column per image, rows = the input and the kept tokens per stage.

    ``model``: an HTS student (or its checkpoint directory). Each image is shown at the model's
    input size, as the model saw it; patches dropped by (the end of) each stage are painted
    white. ``stages="final"`` shows only the last stage (the tokens the final blocks see).
    ``titles`` longer than a cell are shortened in the middle ("…") to its width.
    """
    from .image_processing_sureid import SureidImageProcessor
    from .inference import load_model

    if stages not in ("all", "final"):
        raise ValueError(f"stages must be 'all' or 'final', got {stages!r}")
    model = load_model(model)
    images = list(images)
    if not images:
        raise SureidError("no images to draw")
    kept_indices = _kept_indices(model, images, device)
    config = model.config
    shown = denormalize(
        SureidImageProcessor.from_model_config(config)(images)["pixel_values"], config
    )
    stage_ids = list(range(len(kept_indices)))
    if stages == "final":
        stage_ids = stage_ids[-1:]
    n_rows, n_cols = 1 + len(stage_ids), len(images)
    h, w = config.image_size
    fig, axes = _grid_axes(
        n_rows,
        n_cols,
        (cell_width, cell_width * h / w),
        left=KEPT_LAYOUT["left"],
        top=KEPT_LAYOUT["title" if titles is not None else "top"],
        gap=KEPT_LAYOUT["gap"],
    )
    for col in range(n_cols):
        for row in range(n_rows):
            ax = axes[row][col]
            if row == 0:
                picture, label = shown[col], "input"
            else:
                stage = stage_ids[row - 1]
                picture, label = _kept_cell(shown[col], kept_indices[stage][col], stage, config)
            ax.imshow(picture, interpolation="nearest", aspect="auto")
            if row == 0 and titles is not None:
                _fit_title(ax, str(titles[col]), fontsize=7)
            if col == 0:
                _row_label(ax, label)
    return _save(fig, out, dpi)


def _fit_title(ax, text: str, fontsize: float) -> None:
    """Title ``ax`` with ``text``, shortened in the middle ("…") to the axes' width if longer,
    so neighbouring titles never overlap (the start and the end of a file name both stay)."""
    title = ax.set_title(text, fontsize=fontsize, pad=2)
    renderer = ax.figure.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width
    keep = len(text)
    while keep > 1 and title.get_window_extent(renderer).width > width:
        keep -= 1
        head = (keep + 1) // 2
        title.set_text(text[:head] + "…" + text[len(text) - (keep - head) :])


def _kept_indices(model, images: list[Any], device) -> tuple[torch.Tensor, ...]:
    """Per HTS stage, the kept patch indices [len(images), k] (raises if no token is dropped)."""
    from .inference import extract_features

    result = extract_features(
        model, images, batch_size=32, device=device, progress=False, return_kept=True
    )
    if result.kept_indices is None:
        raise SureidError(
            f"{type(model).__name__} drops no tokens (a teacher, or keep_rate 1.0); kept-token "
            "overlays need an HTS student"
        )
    return result.kept_indices


def _kept_cell(
    image: np.ndarray, kept: torch.Tensor, stage: int, config: SureidConfig
) -> tuple[np.ndarray, str]:
    """One overlay cell: ``image`` with the patches dropped by ``stage`` painted, and its label."""
    picture = overlay_kept_tokens(image, kept_token_mask(kept, config))
    return picture, f"stage {stage + 1}: {len(kept)}/{config.num_patches}"


def _row_label(ax, label: str) -> None:
    """Write a row's label vertically, left of its first cell."""
    ax.text(
        -0.06,
        0.5,
        label,
        rotation=90,
        ha="right",
        va="center",
        fontsize=7,
        transform=ax.transAxes,
    )


# --------------------------------------------------------------------------------------------
# CMC curve
# --------------------------------------------------------------------------------------------


def _cmc_values(value) -> list[float]:
    cmc = getattr(value, "cmc", value)
    return [float(v) for v in cmc]


def plot_cmc(
    cmc,
    out: str | os.PathLike,
    max_rank: int | None = None,
    title: str = "CMC",
    dpi: int = 100,
) -> Path:
    """Save a CMC curve (rank-k accuracy in %, k = 1..max_rank) as PNG.

    ``cmc``: a :class:`~sureid.evaluation.ReidMetrics`, a sequence of rank-k accuracies in
    0..1, or a mapping ``{label: either}`` for several curves on one plot.
    """
    curves = dict(cmc) if isinstance(cmc, Mapping) else {"": cmc}
    if not curves:
        raise ValueError("no CMC curve to plot")
    fig = _figure(figsize=(4.2, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for label, value in curves.items():
        values = _cmc_values(value)
        if max_rank is not None:
            values = values[:max_rank]
        ranks = np.arange(1, len(values) + 1)
        ax.plot(ranks, 100 * np.asarray(values), marker="o", markersize=2.5, label=label or None)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 101)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out, dpi)


# --------------------------------------------------------------------------------------------
# Ranked results
# --------------------------------------------------------------------------------------------


def _as_rgb(image: Any, size: tuple[int, int]) -> np.ndarray:
    from .image_processing_sureid import load_image

    if isinstance(image, str | os.PathLike):
        image = load_image(image)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(
            image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image
        )
    if not isinstance(image, Image.Image):
        raise SureidError(f"cannot draw an input of type {type(image).__name__}")
    h, w = size
    return np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC))


def _framed(image: np.ndarray, color: tuple[int, int, int], width: int) -> np.ndarray:
    out = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3), np.uint8)
    out[:] = np.asarray(color, np.uint8)
    out[width:-width, width:-width] = image
    return out


def plot_ranked_results(
    query_images: Sequence[Any],
    gallery_images: Sequence[Any],
    indices: torch.Tensor | np.ndarray,
    out: str | os.PathLike,
    query_pids: Sequence[int] | None = None,
    gallery_pids: Sequence[int] | None = None,
    scores: torch.Tensor | np.ndarray | None = None,
    k: int | None = None,
    size: tuple[int, int] = (128, 64),
    border: int = 4,
    dpi: int = 100,
) -> Path:
    """Save a grid: each row a query (blue frame) and its top-k gallery images, best first.

    ``indices`` [Q, >=k]: gallery positions per query (e.g. ``GalleryIndex.search(...).indices``).
    With ``query_pids`` and ``gallery_pids`` the frames are green (same pid) or red (another
    pid); without them, gray. ``size``: (height, width) each image is drawn at.
    """
    idx = np.asarray(torch.as_tensor(indices).cpu())
    if idx.ndim != 2 or len(idx) != len(query_images):
        raise ValueError(
            f"indices must be [num_queries, k] with {len(query_images)} rows, got {idx.shape}"
        )
    k = idx.shape[1] if k is None else min(k, idx.shape[1])
    if (query_pids is None) != (gallery_pids is None):
        raise ValueError("pass both query_pids and gallery_pids (or neither)")
    score = None if scores is None else np.asarray(torch.as_tensor(scores).cpu())
    n_rows, n_cols = len(query_images), k + 1
    h, w = size
    cell_w = 0.75
    fig, axes = _grid_axes(
        n_rows,
        n_cols,
        (cell_w, cell_w * (h + 2 * border) / (w + 2 * border)),
        left=0.05,
        top=0.2,
        gap=(0.06, 0.22),
    )
    for r in range(n_rows):
        ax = axes[r][0]
        ax.imshow(_framed(_as_rgb(query_images[r], size), QUERY_COLOR, border), aspect="auto")
        ax.set_title(
            "query" + (f" {query_pids[r]}" if query_pids is not None else ""), fontsize=7, pad=2
        )
        ax.axis("off")
        for c in range(k):
            g = int(idx[r, c])
            if query_pids is None:
                color = (150, 150, 150)
            else:
                color = CORRECT_COLOR if gallery_pids[g] == query_pids[r] else WRONG_COLOR
            ax = axes[r][c + 1]
            ax.imshow(_framed(_as_rgb(gallery_images[g], size), color, border), aspect="auto")
            label = f"{c + 1}"
            if score is not None:
                label += f" ({score[r, c]:.2f})"
            ax.set_title(label, fontsize=7, pad=2)
            ax.axis("off")
    return _save(fig, out, dpi)
