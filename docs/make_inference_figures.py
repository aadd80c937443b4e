"""Generate the pictures of docs/inference.md from the built-in synthetic set.

    python docs/make_inference_figures.py --threads 1   # 13-22 min on a busy 2-core CPU
    python docs/make_inference_figures.py --epochs 0    # random weights, under a minute

What it does, so the pictures can be read for what they are: builds the synthetic occluded set
at 128x64 (32 train ids, 16 test ids), trains a *tiny* HTS student from scratch on it for
``--epochs`` epochs (hidden 96, 6 blocks, patch 8 -> a 16x8 grid = 128 tokens like the paper's
256x128 / 16, stages before blocks 2, 4, 6, keep rate 0.7; loss = identity cross-entropy +
2 x the keep-ratio loss; no teacher, no NODA: the training code of the package is not used here
on purpose, the pictures are about inference), then extracts features with
``sureid.extract_features``, evaluates with and without re-ranking and draws the three figures
into docs/images/ (image grids reduced to 128 colours to keep the PNGs small). It prints the
numbers quoted in docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sureid import (
    GalleryIndex,
    SureidImageProcessor,
    SureidStudentConfig,
    SureidStudentModel,
    extract_features,
)
from sureid.data import load_reid_dataset, make_synthetic_reid
from sureid.evaluation import evaluate_model
from sureid.visualize import plot_cmc, plot_kept_tokens, plot_ranked_results

HERE = Path(__file__).resolve().parent


def train(model: SureidStudentModel, train_split, epochs: int, batch_size: int, seed: int):
    """Identity cross-entropy + the keep-ratio loss, AdamW, random flips. Deliberately minimal."""
    processor = SureidImageProcessor.from_model_config(model.config)
    images = [train_split[i]["image"].convert("RGB") for i in range(len(train_split))]
    pixels = processor(images)["pixel_values"]
    labels = torch.tensor(train_split["pid"])
    targets = model.config.stage_keep_ratios
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        total, correct = 0.0, 0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            x = pixels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            out = model(x, labels=labels[idx])
            ratio = sum(
                ((mask.mean(1) - t) ** 2).mean() for mask, t in zip(out.keep_masks, targets)
            )
            loss = out.loss + 2.0 * ratio
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((out.logits.argmax(1) == labels[idx]).sum())
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(
                f"epoch {epoch + 1:3d}: loss {total / len(images):.3f}, "
                f"train accuracy {correct / len(images):.2f}"
            )
    model.eval()
    return model


def shrink_png(path: Path, colors: int = 128) -> None:
    """Re-save a PNG with a palette of ``colors`` (no dithering): a third of the size."""
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(
            colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    small.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/sureid-docs-synthetic")
    parser.add_argument("--out", default=str(HERE / "images"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    root = make_synthetic_reid(
        args.data, num_train_ids=32, num_test_ids=16, size=(128, 64), images_per_train_id=8,
        queries_per_id=2, gallery_per_id=6, num_cameras=6, seed=args.seed,
    )  # fmt: skip
    data = load_reid_dataset("synthetic", root)
    num_ids = len(set(data["train"]["pid"]))
    config = SureidStudentConfig(
        image_size=(128, 64), patch_size=8, stride_size=8, hidden_size=96,
        num_hidden_layers=6, num_attention_heads=4, sparsify_layers=(1, 3, 5),
        keep_rate=0.7, num_identities=num_ids, drop_path_rate=0.0,
    )  # fmt: skip
    model = SureidStudentModel(config)
    start = time.perf_counter()
    if args.epochs:
        train(model, data["train"], args.epochs, args.batch_size, args.seed)
    train_minutes = (time.perf_counter() - start) / 60
    model.eval()

    query, gallery = data["query"], data["gallery"]
    plain = evaluate_model(model, query, gallery, protocol="market", device="cpu", progress=False)
    reranked = evaluate_model(
        model, query, gallery, protocol="market", device="cpu", progress=False, rerank=True
    )
    print(f"trained {args.epochs} epochs in {train_minutes:.1f} min")
    print("plain:\n" + plain.table())
    print("re-ranked:\n" + reranked.table())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Kept tokens on the first 8 queries (all occluded in the synthetic set).
    picks = list(range(0, 16, 2))
    plot_kept_tokens(
        model,
        [query[i]["image"] for i in picks],
        out / "inference_kept_tokens.png",
        titles=[f"pid {query[i]['pid']}" for i in picks],
        cell_width=0.8,
    )
    plot_cmc(
        {"plain": plain.metrics, "k-reciprocal re-ranking": reranked.metrics},
        out / "inference_cmc.png",
        max_rank=20,
        title=f"synthetic set, tiny student ({args.epochs} epochs)",
    )
    query_feats = extract_features(model, query, progress=False)
    gallery_feats = extract_features(model, gallery, progress=False)
    hits = GalleryIndex(gallery_feats).search(query_feats[picks[:5]], k=6)
    plot_ranked_results(
        [query[i]["image"] for i in picks[:5]],
        list(gallery["path"]),
        hits.indices,
        out / "inference_ranked.png",
        query_pids=[query[i]["pid"] for i in picks[:5]],
        gallery_pids=list(gallery["pid"]),
        scores=hits.scores,
    )
    summary = {
        "epochs": args.epochs,
        "train_minutes": round(train_minutes, 2),
        "plain": plain.to_dict(),
        "reranked": reranked.to_dict(),
    }
    for key in ("plain", "reranked"):
        summary[key].pop("cmc")
    print(json.dumps(summary, indent=1))
    for name in ("inference_kept_tokens.png", "inference_ranked.png"):
        shrink_png(out / name)
    for name in ("inference_kept_tokens.png", "inference_cmc.png", "inference_ranked.png"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
