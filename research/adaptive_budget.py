"""A per-image token budget (issue 26): does keeping fewer tokens where fewer are needed beat
fixed-k at the same mean number of kept tokens?

For each finished demo folder (one per seed) and each HTS student in it, this compares at
inference, on the demo's query / gallery splits (Market protocol, every query occluded):

- ``fixed-k``: the student as it runs (the stage's k top-scoring tokens, every image);
- ``adaptive``: per-image k at each stage, the tokens whose keep logit passes a per-stage
  threshold, clamped to ``[k_min, k_max]`` = ``[lo * k, min(hi * k, alive)]``; the thresholds are
  calibrated on the training images, stage by stage (stage j's logits depend on stage j-1's
  decisions), by bisection so that the mean kept count equals ``budget * k`` after clamping;
- ``fixed-k at the adaptive mean``: fixed-k with the adaptive rows' mean counts (rounded), for
  the rows whose budget is not 1.

Both run the masked path (``forward_masked``: the same class token as true dropping for the same
decisions), so the comparison is about which tokens are kept, not how. It also reports the kept
counts on occluded and unoccluded images (the synthetic set knows which) and their spread.

    python -m research.adaptive_budget /tmp/demo_s0 /tmp/demo_s1 /tmp/demo_s2 --budgets 1.0 0.9

research/notes/adaptive-budget.md quotes its tables.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from sureid import SureidStudentModel
from sureid.data.datasets import load_reid_dataset
from sureid.evaluation import evaluate_splits
from sureid.image_processing_sureid import SureidImageProcessor
from sureid.inference import iter_pixel_batches

ROWS = ("hts", "hts_npkd", "hts_npkd_noda")
BATCH_ROW = "batch_budget"  # the SUREID row retrained with the batch-mean budget (--train)


def batch_ratio_loss(lo: float, hi: float):
    """Eq. (9) with the budget on the batch's mean kept share, not each image's, plus a
    penalty outside the per-image bounds ``[lo * target, hi * target]``."""

    def loss(keep_masks, targets):
        kept = torch.stack([m.float().mean(dim=1) for m in keep_masks], dim=1)  # [B, S]
        target = torch.tensor(list(targets), dtype=kept.dtype, device=kept.device)
        mean_term = ((kept.mean(dim=0) - target) ** 2).sum()
        below = torch.relu(lo * target - kept) ** 2
        above = torch.relu(kept - hi * target) ** 2
        return mean_term + (below + above).sum(dim=1).mean()

    return loss


def train_batch_budget(folder: Path, seed: int, lo: float, hi: float) -> None:
    """The demo's SUREID row (HTS + NPKD + NODA), fine-tuned from the folder's dense start with
    the folder's teacher as the demo does, but with :func:`batch_ratio_loss`; saved in
    ``folder/batch_budget``. Kept when it is already there."""
    import sureid.trainer
    from sureid import SureidTeacherModel
    from sureid.demo import DemoSettings, train_student

    if (folder / BATCH_ROW / "config.json").is_file():
        return
    s = DemoSettings(seed=seed, out_dir=str(folder))
    data = load_reid_dataset("synthetic", folder / "data")
    start = SureidStudentModel.from_pretrained(folder / "dense_start")
    teacher = SureidTeacherModel.from_pretrained(folder / "teacher").eval()
    original = sureid.trainer.ratio_loss
    sureid.trainer.ratio_loss = batch_ratio_loss(lo, hi)
    try:
        train_student("hts+npkd+noda", s, data, folder, start_from=start, teacher=teacher,
                      name=BATCH_ROW)  # fmt: skip
    finally:
        sureid.trainer.ratio_loss = original


@dataclass
class Budget:
    """Per-stage thresholds on the keep logit and the per-image bounds of the kept count."""

    thresholds: list[float]
    k_min: list[int]
    k_max: list[int]


def ranked_keep(keep_logit: torch.Tensor, keep_mask: torch.Tensor, counts: torch.Tensor):
    """A 0/1 mask keeping, in each row, the ``counts[b]`` alive tokens of highest logit."""
    alive = keep_mask > 0
    order = keep_logit.float().masked_fill(~alive, float("-inf")).argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1]).expand_as(order).contiguous()
    )
    return ((rank < counts.unsqueeze(1)) & alive).to(keep_mask.dtype)


def adaptive_counts(stage: int, keep_logit, keep_mask, budget: Budget) -> torch.Tensor:
    """Per-image kept count at ``stage``: tokens over the threshold, clamped to the bounds."""
    alive = keep_mask > 0
    over = ((keep_logit > budget.thresholds[stage]) & alive).sum(dim=1)
    high = torch.minimum(alive.sum(dim=1), torch.tensor(budget.k_max[stage]))
    return over.clamp(min=budget.k_min[stage]).minimum(high)


def adaptive_decisions(budget: Budget, record: dict | None = None):
    def decide(stage, keep_logit, keep_mask):
        counts = adaptive_counts(stage, keep_logit, keep_mask, budget)
        if record is not None:
            record.setdefault(stage, []).append((keep_logit.float(), keep_mask.clone()))
        return ranked_keep(keep_logit, keep_mask, counts)

    return decide


def fixed_decisions(counts_per_stage: list[int]):
    def decide(stage, keep_logit, keep_mask):
        counts = torch.full((keep_logit.shape[0],), counts_per_stage[stage])
        return ranked_keep(keep_logit, keep_mask, counts)

    return decide


def shuffled_decisions(counts_by_stage: list[torch.Tensor], generator: torch.Generator):
    """Per-image counts drawn at random from ``counts_by_stage[j]`` (the adaptive counts of the
    training images at stage j), the top-scoring tokens kept: the adaptive spread of counts,
    but not the threshold's choice of which image gets fewer."""

    def decide(stage, keep_logit, keep_mask):
        pool = counts_by_stage[stage]
        pick = pool[torch.randint(len(pool), (keep_logit.shape[0],), generator=generator)]
        counts = torch.minimum(pick, (keep_mask > 0).sum(dim=1)).clamp(min=1)
        return ranked_keep(keep_logit, keep_mask, counts)

    return decide


def run_masked(student, split, decide, batch_size=128):
    """Embeddings and per-stage kept counts of ``split`` under ``decide``."""
    processor = SureidImageProcessor.from_model_config(student.config)
    feats, counts = [], []
    with torch.inference_mode():
        for _indices, pixels in iter_pixel_batches(split, processor, batch_size):
            out = student.forward_masked(pixels, decide=decide)
            feats.append(torch.nn.functional.normalize(out.embeddings.float(), dim=1))
            counts.append(torch.stack([m.sum(dim=1) for m in out.keep_masks], dim=1))
    return torch.cat(feats), torch.cat(counts)


def calibrate(student, train, budget_scale: float, lo: float, hi: float) -> Budget:
    """Thresholds, stage by stage, so the mean kept count on ``train`` is budget_scale * k_j."""
    ks = student.config.stage_keep_counts
    budget = Budget(
        thresholds=[float("inf")] * len(ks),
        k_min=[max(1, round(lo * k)) for k in ks],
        k_max=[max(1, round(hi * k)) for k in ks],
    )
    for stage, k in enumerate(ks):
        record: dict = {}
        run_masked(student, train, adaptive_decisions(budget, record))
        logits = torch.cat([lg for lg, _ in record[stage]])
        masks = torch.cat([m for _, m in record[stage]])
        target = budget_scale * k
        low, high = float(logits.min()) - 1, float(logits.max()) + 1
        for _ in range(60):  # mean count is non-increasing in the threshold
            mid = (low + high) / 2
            budget.thresholds[stage] = mid
            mean = adaptive_counts(stage, logits, masks, budget).float().mean().item()
            low, high = (mid, high) if mean > target else (low, mid)
        budget.thresholds[stage] = (low + high) / 2
    return budget


def evaluate(student, data, decide) -> dict:
    q, q_counts = run_masked(student, data["query"], decide)
    g, g_counts = run_masked(student, data["gallery"], decide)
    metrics = evaluate_splits(q, g, data["query"], data["gallery"], protocol="market")
    counts = torch.cat([q_counts, g_counts]).float()
    occluded = torch.tensor(list(data["query"]["occluded"]) + list(data["gallery"]["occluded"]))
    last = counts[:, -1]
    return {
        "R1": 100 * float(metrics.cmc[0]),
        "mAP": 100 * float(metrics.mAP),
        "mean": [round(float(c), 1) for c in counts.mean(dim=0)],
        "last_sd": float(last.std()),
        "last_occ": float(last[occluded].mean()),
        "last_unocc": float(last[~occluded].mean()) if (~occluded).any() else float("nan"),
    }


def study(folder: Path, rows, budgets, lo, hi, shuffled: bool = False) -> list[dict]:
    data = load_reid_dataset("synthetic", folder / "data")
    results = []
    for row in rows:
        student = SureidStudentModel.from_pretrained(folder / row).eval()
        ks = student.config.stage_keep_counts
        base = evaluate(student, data, fixed_decisions(ks))
        results.append({"seed": folder.name, "row": row, "method": "fixed-k", **base})
        for scale in budgets:
            budget = calibrate(student, data["train"], scale, lo, hi)
            ada = evaluate(student, data, adaptive_decisions(budget))
            results.append({"seed": folder.name, "row": row, "method": f"adaptive x{scale}", **ada})
            if shuffled:
                _, train_counts = run_masked(student, data["train"], adaptive_decisions(budget))
                pools = [train_counts[:, j].long() for j in range(train_counts.shape[1])]
                draw = torch.Generator().manual_seed(0)
                mixed = evaluate(student, data, shuffled_decisions(pools, draw))
                method = f"shuffled counts x{scale}"
                results.append({"seed": folder.name, "row": row, "method": method, **mixed})
            if scale != 1.0:
                matched = [max(1, round(m)) for m in ada["mean"]]
                fix = evaluate(student, data, fixed_decisions(matched))
                results.append(
                    {"seed": folder.name, "row": row, "method": f"fixed-k x{scale}", **fix}
                )
    return results


def print_table(results: list[dict]) -> None:
    head = (
        "| seed | row | method | R1 | mAP | mean kept per stage | last: sd, occluded, unoccluded |"
    )
    print(head)
    print("|---" * 7 + "|")
    for r in results:
        print(
            f"| {r['seed']} | {r['row']} | {r['method']} | {r['R1']:.1f} | {r['mAP']:.1f} | "
            f"{r['mean']} | {r['last_sd']:.1f}, {r['last_occ']:.1f}, {r['last_unocc']:.1f} |"
        )
    print("\nMean over seeds:")
    keys = sorted({(r["row"], r["method"]) for r in results}, key=lambda x: (x[0], x[1]))
    for row, method in keys:
        sel = [r for r in results if r["row"] == row and r["method"] == method]
        each = ", ".join(f"{r['R1']:.1f}" for r in sel)
        print(
            f"| {row} | {method} | R1 {statistics.mean(r['R1'] for r in sel):.1f} "
            f"({each}) | mAP "
            f"{statistics.mean(r['mAP'] for r in sel):.1f} | last stage occluded "
            f"{statistics.mean(r['last_occ'] for r in sel):.1f} vs unoccluded "
            f"{statistics.mean(r['last_unocc'] for r in sel):.1f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished `sureid demo` folders")
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.9])
    parser.add_argument("--lo", type=float, default=0.5, help="k_min = lo * k")
    parser.add_argument("--hi", type=float, default=1.5, help="k_max = hi * k (at most alive)")
    parser.add_argument(
        "--shuffled",
        action="store_true",
        help="also keep the adaptive spread of counts, each image's count drawn at random",
    )
    parser.add_argument(
        "--train",
        nargs="+",
        type=int,
        metavar="SEED",
        help="also train the SUREID row with the batch-mean budget (row batch_budget), one seed "
        "per folder, and compare it",
    )
    args = parser.parse_args(argv)
    rows = list(args.rows)
    if args.train:
        if len(args.train) != len(args.folders):
            parser.error("--train takes one seed per folder")
        for folder, seed in zip(args.folders, args.train):
            train_batch_budget(folder, seed, args.lo, args.hi)
        rows.append(BATCH_ROW)
    torch.manual_seed(0)
    results = []
    for folder in args.folders:
        results += study(folder, rows, args.budgets, args.lo, args.hi, args.shuffled)
    print_table(results)


if __name__ == "__main__":
    main()
