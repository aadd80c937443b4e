"""What NPKD's loss asks of a demo student, and how far the student moved toward the teacher.

NPKD (eq. 13) pulls the student's class-token feature toward the teacher's, interpolated to the
student's width (``|| f_s - I(f_t) ||^2``), and its identity distribution toward the teacher's
(KL). For the teacher and each student of a finished ``sureid demo`` folder (or of one seed of
``research.demo_ablation``), on the training images without augmentation, models in eval
mode (the students drop tokens as they run), this prints:

- the feature term as the trainer computes it (mean over channels), split exactly
  into an *offset* part, the squared difference of the two mean features (the same for every
  image: it carries no identity), and a *per-image* part, the squared difference of each
  image's deviation from its model's mean feature (what can tell identities apart);
- the spread: the mean distance of a feature from its model's mean, for the student and for
  ``I(f_t)`` (the scale the per-image part asks the student to take);
- linear CKA between the student's and the teacher's features (1 = the same geometry up to a
  rotation and a scale; how far distillation moved the student toward the teacher);
- the KL term at T = 1 (the trainer weighs it by ``lambda_kl`` = 0.1), and, for the teacher
  and each student, how often its classifier ranks the image's identity first and the mean
  probability of its top identity (how far from flat the distributions the KL compares are).

research/notes/npkd.md quotes its table. From the repository root:

    sureid demo --seed 0 --out runs/demo_s0
    python -m research.npkd_probe runs/demo_s0
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from sureid import SureidImageProcessor, SureidModel
from sureid.data import load_reid_dataset
from sureid.inference import iter_pixel_batches
from sureid.losses import interpolate_feature, kd_kl_loss

DEMO_MODELS = ["dense_start", "dense", "hts", "hts_npkd", "hts_npkd_noda"]


def feature_term_split(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[float, float, float]:
    """(total, offset, per-image) of the mean-squared feature term between [B, C] features of
    the same width: total = offset + per-image, exactly."""
    total = (f_s - f_t).pow(2).mean()
    mean_s, mean_t = f_s.mean(dim=0), f_t.mean(dim=0)
    offset = (mean_s - mean_t).pow(2).mean()
    per_image = ((f_s - mean_s) - (f_t - mean_t)).pow(2).mean()
    return float(total), float(offset), float(per_image)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al.) of [B, C_a] and [B, C_b] features of the same images."""
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    cross = (a.T @ b).norm() ** 2
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


def spread(features: torch.Tensor) -> float:
    """Mean distance of a feature from the mean feature."""
    return float((features - features.mean(dim=0)).norm(dim=1).mean())


def features_and_logits(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    processor = SureidImageProcessor.from_model_config(model.config)
    features, logits = [], []
    with torch.no_grad():
        for _, pixels in iter_pixel_batches(images, processor, 64):
            out = model(pixel_values=pixels)
            features.append(out.features.float())
            logits.append(out.logits.float())
    return torch.cat(features), torch.cat(logits)


def classifier_sharpness(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(share of images whose identity the logits rank first, mean top softmax probability)."""
    top1 = float((logits.argmax(dim=-1) == labels).float().mean())
    return top1, float(logits.softmax(dim=-1).max(dim=-1).values.mean())


def probe(student, teacher_features, teacher_logits, images) -> dict[str, float]:
    f_s, logits = features_and_logits(student, images)
    target = interpolate_feature(teacher_features, f_s.shape[-1])
    total, offset, per_image = feature_term_split(f_s, target)
    top1, top_p = classifier_sharpness(logits, torch.tensor(images["pid"]))
    return {
        "feature term": total,
        "offset": offset,
        "per-image": per_image,
        "spread": spread(f_s),
        "teacher spread": spread(target),
        "CKA": linear_cka(f_s, teacher_features),
        "KL": float(kd_kl_loss(logits, teacher_logits)),
        "top-1": top1,
        "top p": top_p,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_folder", type=Path, help="a finished `sureid demo --out` folder")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="student folders under demo_folder (default: the demo's rows that are there)",
    )
    parser.add_argument("--images", type=int, default=512, help="training images, evenly spaced")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # the weight-loading bars of every model
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_reid_dataset("synthetic", args.demo_folder / "data")["train"]
    images = train.select(range(0, len(train), max(1, len(train) // args.images)))
    names = args.models or [n for n in DEMO_MODELS if (args.demo_folder / n).is_dir()]
    teacher = SureidModel.from_pretrained(args.demo_folder / "teacher").eval()
    f_t, logits_t = features_and_logits(teacher, images)
    top1, top_p = classifier_sharpness(logits_t, torch.tensor(images["pid"]))
    ids = logits_t.shape[-1]
    print(f"{len(images)} training images, no augmentation, models in eval mode")
    print(
        f"teacher: identity ranked first on {100 * top1:.1f}% of them, mean top probability "
        f"{100 * top_p:.1f}% (uniform over {ids} identities: {100 / ids:.1f}%)\n"
    )
    print(
        "| model | feature term (mean over channels) | offset part | per-image part "
        "| spread: student / I(teacher) | CKA with the teacher | KL | top-1 / top probability |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        student = SureidModel.from_pretrained(args.demo_folder / name).eval()
        m = probe(student, f_t, logits_t, images)
        print(
            f"| {name} | {m['feature term']:.4f} | {m['offset']:.4f} | {m['per-image']:.4f} "
            f"| {m['spread']:.3f} / {m['teacher spread']:.3f} | {m['CKA']:.3f} | {m['KL']:.3f} "
            f"| {100 * m['top-1']:.1f}% / {100 * m['top p']:.1f}% |"
        )


if __name__ == "__main__":
    main()
