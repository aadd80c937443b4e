"""Print the "how hard is the synthetic set" table of docs/datasets.md.

    python benchmarks/synthetic_baselines.py            # about a minute on one CPU core

Rank-1 / mAP (%) of untrained features on two synthetic sets: the defaults of
``make_synthetic_reid`` (32 test ids, 256x128) and the demo's set (64 train / 64 test ids,
made at 128x64, seed 0). Features: raw pixels and RGB histograms at 64x32, a randomly
initialised ViT-Tiny (timm, patch 8, 64x32), and, on the demo's set, the demo backbone
(pretrained on other synthetic people, not fine-tuned on this set). Cosine distance, the
Market/Duke protocol (same-id same-camera gallery images excluded).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from sureid.data import IMAGENET_MEAN, IMAGENET_STD, load_reid_dataset, make_synthetic_reid
from sureid.demo import BUILTIN_BACKBONE, backbone_model
from sureid.evaluation import evaluate_reid
from sureid.inference import extract_features

SMALL = (64, 32)


def _small(images) -> list[Image.Image]:
    return [im.convert("RGB").resize(SMALL[::-1], Image.BILINEAR) for im in images]


def raw_pixels(images) -> torch.Tensor:
    return torch.tensor(
        np.stack([np.asarray(im, dtype=np.float32).ravel() for im in _small(images)])
    )


def rgb_histogram(images, bins: int = 8) -> torch.Tensor:
    rows = []
    for im in _small(images):
        a = np.asarray(im)
        hist = [np.histogram(a[..., c], bins=bins, range=(0, 256))[0] for c in range(3)]
        rows.append(np.concatenate(hist).astype(np.float32) / a[..., 0].size)
    return torch.tensor(np.stack(rows))


def random_vit(images) -> torch.Tensor:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=SMALL, patch_size=8, num_classes=0
    ).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
            for im in _small(images)
        ]
    )
    with torch.no_grad():
        return model.forward_features((x - mean) / std)[:, 0]


def demo_backbone(images) -> torch.Tensor:
    return extract_features(backbone_model(BUILTIN_BACKBONE), list(images), progress=False)


def score(data, featurise) -> str:
    q, g = data["query"], data["gallery"]
    result = evaluate_reid(
        featurise(q["image"]), featurise(g["image"]), q["pid"], g["pid"], q["camid"], g["camid"]
    )
    return f"{100 * result.rank(1):.1f} / {100 * result.mAP:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="where to write the sets (default: temp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        defaults = load_reid_dataset("synthetic", make_synthetic_reid(work / "defaults"))
        demo_set = load_reid_dataset(
            "synthetic",
            make_synthetic_reid(work / "demo", num_train_ids=64, num_test_ids=64, size=(128, 64)),
        )
        rows = [
            ("raw pixels", raw_pixels),
            ("RGB histogram (8 bins per channel)", rgb_histogram),
            ("randomly initialised ViT-Tiny (timm, patch 8)", random_vit),
        ]
        print("| features | defaults (32 test ids) | the demo's set (64 test ids, 128x64) |")
        print("|---|---|---|")
        for name, featurise in rows:
            print(f"| {name} | {score(defaults, featurise)} | {score(demo_set, featurise)} |")
        print(
            "| the demo backbone, not fine-tuned (other people; 128x64, patch 8) | "
            f"| {score(demo_set, demo_backbone)} |"
        )


if __name__ == "__main__":
    main()
