"""Why did the paper's HTS recipe teach the predictors to drop the person? A probe on the demo.

Trains only fresh token predictors (everything else frozen) on top of the demo's trained dense
student, once per training variant (sampling of the decisions, loss terms), and reports what
they learned: the Spearman correlation of the stage-1 keep score with the dense model's attention
rollout (per query image, averaged), R1 / mAP with the predictors against random keeping and
against the rollout's own top-k, and the share of the last stage's kept patches on the visible
body. Before training, it also measures which way each loss term pushes the stage-1 keep logits:
the Spearman correlation, per image, of minus the term's gradient with the rollout (positive:
the term raises the keep logits of the tokens the model attends to).

research/notes/predictor-init.md quotes its output. From the repository root:

    python -m research.hts_probe --out runs/hts-probe --seed 0

(about 8 minutes on 2 CPU cores; the demo's data, backbone and dense student are made first
and reused when ``--out`` already holds them). ``--quick`` starts from
``sureid.demo.quick_settings`` (tiny sizes, one epoch: a smoke run whose numbers mean nothing).

The rows guided toward the dense model's rollout (and the guidance term's push) trained with
an option that has left the library (``token_guidance="rollout"``). Retired options'
experiments: `git checkout 8907d49` and the command as documented then.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sureid import SureidStudentModel
from sureid.analysis import check_token_selection, spearman_rows, token_importance
from sureid.demo import (
    DemoSettings,
    load_pretrained,
    prepare_data,
    quick_settings,
    train_student,
    training_arguments,
)
from sureid.losses import cross_entropy_label_smooth, ratio_loss, triplet_loss
from sureid.modeling_sureid import init_from_pretrained


@dataclass(frozen=True)
class Variant:
    """How the fresh predictors are trained (everything else of the student is frozen)."""

    sampling: str = "gumbel"  # "gumbel": the paper's per-token decisions; or "gumbel-topk"
    beta: float = 1.0  # weight of CE + triplet
    lambda_ratio: float = 2.0
    start: float | None = None  # keep probability of the new predictors (None: the budget)
    stages: tuple[int, ...] | None = None  # None: the demo's three stages
    predictor_lr: float | None = None  # None: the demo's learning rate (not its predictors')


VARIANTS = {
    # The cause: the ratio loss alone, started below, at and above the budget (p = 0.7)
    "ratio alone, start 0.5 (the old init)": Variant(beta=0.0, start=0.5),
    "ratio alone, start 0.5, one stage": Variant(beta=0.0, start=0.5, stages=(1,)),
    "ratio alone, start 0.12": Variant(beta=0.0, start=0.12, stages=(1,)),
    "ratio alone, start 0.88": Variant(beta=0.0, start=0.88, stages=(1,)),
    # The paper's recipe, old init and started at the budget (the fix of the init)
    "CE + triplet alone, start 0.5": Variant(lambda_ratio=0.0, start=0.5),
    "CE + triplet + ratio (paper), start 0.5": Variant(start=0.5),
    "CE + triplet + ratio (paper), start at budget": Variant(),
    # Exactly k tokens per stage (the ratio loss is then 0)
    "CE + triplet, Gumbel-top-k": Variant(sampling="gumbel-topk"),
}


def dense_student(s: DemoSettings, data, out: Path) -> SureidStudentModel:
    """The demo's dense student: loaded from ``out/dense`` or trained there."""
    path = out / "dense"
    if (path / "config.json").is_file():
        return SureidStudentModel.from_pretrained(path).eval()
    pretrained, _ = load_pretrained(s)
    return train_student("dense", s, data, out, pretrained=pretrained).model


def hts_student(s: DemoSettings, dense, v: Variant) -> SureidStudentModel:
    """An HTS student with the dense student's weights and fresh predictors (started at keep
    probability ``v.start``, or the budget); only the predictors learn."""
    config = dense.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        config.pop(key, None)
    stages = list(v.stages or s.sparsify_layers)
    config.update(keep_rate=s.keep_rate, sparsify_layers=stages, hts_sampling=v.sampling)
    torch.manual_seed(s.seed + 2)
    student = SureidStudentModel(SureidStudentModel.config_class(**config))
    init_from_pretrained(student, dense)
    if v.start is not None:
        with torch.no_grad():
            for predictor in student.predictors:
                bias = predictor.out_conv[-1].bias
                bias.zero_()
                bias[1] = math.log(v.start / (1 - v.start))
    for name, param in student.named_parameters():
        param.requires_grad_(name.startswith("predictors."))
    student.head.bottleneck.momentum = 0.0  # keep the frozen BNNeck's running statistics
    return student


def push_directions(student, dense, pixels, labels) -> dict[str, float]:
    """Per loss term: Spearman(-d term / d stage-1 keep logit, dense rollout), batch mean."""
    student.train()
    out = student(pixel_values=pixels)
    rollout = token_importance(dense, pixels, "rollout")
    cfg = student.config
    terms = {
        "CE": cross_entropy_label_smooth(out.logits, labels, 0.1),
        "triplet": triplet_loss(out.features, labels, 0.3),
        "ratio": ratio_loss(out.keep_masks, [k / cfg.num_patches for k in cfg.stage_keep_counts]),
    }
    result = {}
    for name, term in terms.items():
        (grad,) = torch.autograd.grad(term, out.keep_logits[0], retain_graph=True)
        nonzero = grad.abs().sum(dim=1) > 0
        if not bool(nonzero.any()):
            result[name] = float("nan")  # the term does not reach the keep logits (ratio: top-k)
            continue
        result[name] = float(spearman_rows(-grad[nonzero], rollout[nonzero]).mean())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hts-probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=96, help="predictor training steps")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one epoch: a smoke run")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = Path(args.out)
    s = (quick_settings if args.quick else DemoSettings)(out_dir=str(out), seed=args.seed)
    data = prepare_data(s, out)
    dense = dense_student(s, data, out)

    from sureid.data.noda import build_train_collator
    from sureid.trainer import SureidTrainer

    collate = build_train_collator(s.image_size, noda=False)
    batch = collate([data["train"][i] for i in range(32)])
    rows = []
    for name, v in VARIANTS.items():
        student = hts_student(s, dense, v)
        torch.manual_seed(args.seed)
        push = push_directions(student, dense, batch["pixel_values"], batch["labels"])
        trainer_args = training_arguments(
            s,
            out / "probe-run",
            max_steps=args.steps,
            noda=False,
            beta=v.beta,
            lambda_ratio=v.lambda_ratio,
            predictor_learning_rate=v.predictor_lr,
            use_cpu=True,
            disable_tqdm=True,
            log_level="error",
        )
        SureidTrainer(model=student, args=trainer_args, train_dataset=data["train"]).train()
        check = check_token_selection(
            student.eval(), data["query"], data["gallery"], guide=dense, seed=args.seed
        )
        rows.append((name, push, check))
        print(f"{name}: {check.summary()}  push {push}", flush=True)

    print(f"\nseed {args.seed}, {args.steps} predictor steps on the frozen dense student")
    print(
        "| training of the predictors | push of CE / triplet / ratio at step 0 | "
        "Spearman vs rollout | R1 / mAP predictors | random | rollout top-k | on body (chance) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, push, check in rows:
        c = check.summary()
        pushes = " / ".join("-" if v != v else f"{v:+.2f}" for v in push.values())
        print(
            f"| {name} | {pushes} | {c['spearman']:+.2f} | "
            f"{100 * c['predictor_R1']:.1f} / {100 * c['predictor_mAP']:.1f} | "
            f"{100 * c['random_R1']:.1f} / {100 * c['random_mAP']:.1f} | "
            f"{100 * c['guide_R1']:.1f} / {100 * c['guide_mAP']:.1f} | "
            f"{100 * c['body_share']:.0f}% ({100 * c['body_chance']:.0f}%) |"
        )


if __name__ == "__main__":
    main()
