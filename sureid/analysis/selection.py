"""Has an HTS student learned which tokens to keep? The token-selection check.

``check_token_selection`` runs a trained student on the query and gallery splits as it runs
(true dropping), with as many tokens kept at random (the baseline its predictors must beat),
with a guide's importance top-k (an oracle), and measures how its keep scores relate to the
guide's importance, to the visible body and to the occluder. Opt-in: the demo runs it, the
trainer only when asked (``SureidTrainer(..., check_token_selection=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..configuration_sureid import SureidError
from ..evaluation import ReidMetrics, evaluate_splits
from ..image_processing_sureid import SureidImageProcessor
from ..inference import iter_pixel_batches, resolve_device
from .importance import IMPORTANCE_METHODS, resample_importance, token_importance


@dataclass
class TokenSelectionCheck:
    """Has an HTS student learned which tokens to keep? (``check_token_selection``)

    ``predictor``: R1/mAP as the student runs (top-k of its keep scores, true dropping).
    ``random``: the same number of tokens per stage kept uniformly at random: the baseline the
    predictors must beat; its CMC, mAP and mINP are the mean over ``random_draws`` (each
    draw's metrics; one draw moves R1 by several points). ``guide``: the top-k of the guide's
    token importance kept instead (a full dense pass of the teacher: an oracle, not an
    inference path). ``spearman``: rank correlation between the stage-1 keep score and the
    guide's importance, mean over the query images; ``other_spearman``: the same against the
    guide's other importances asked for (e.g. ``{"attention-norm": ...}``). ``body_share``: share of the last stage's
    kept patches that are mostly (over half) visible body; ``guide_body_share``: the same for
    the guide's top-k; ``body_chance``: the share of all patches that are, i.e. random
    keeping's; ``body_share_by_stage``: ``body_share`` after each stage (the last is
    ``body_share``). ``body_auc``: the probability that a visible-body patch has a higher stage-1
    keep score than a patch that is not (0.5 = no preference; mean over the queries that have
    both), and ``guide_body_auc`` the same for the guide's importance: whether the reference
    of ``spearman`` itself points at the person.

    With occluder masks (the synthetic set's): ``occluder_share``, the share of the last
    stage's kept patches that are mostly occluder, and ``occluder_chance``, random keeping's;
    ``stage1_ranking``: R1/mAP when every stage keeps its top-k by the stage-1 keep score (the
    predictors' first ranking, held fixed), and ``occluder_dropped``: the same ranking with the
    occluder's patches put last (an oracle: what the predictors would score if they only
    learned to drop the occluder).

    ``sampling_overlap``: how close the student's training is to its inference: the share of
    the last stage's top-k (what inference keeps) that one draw of the config's training
    sampling (``hts_sampling``, on the eval-mode model) also keeps, mean over the queries;
    ``sampling_overlap_chance``: the same for a random draw of as many tokens (the sample's
    size over N). Near chance, the student trains on what is close to random keeping.
    """

    predictor: ReidMetrics
    random: ReidMetrics
    guide: ReidMetrics | None = None
    spearman: float | None = None
    other_spearman: dict[str, float] = field(default_factory=dict)
    body_share: float | None = None
    guide_body_share: float | None = None
    body_chance: float | None = None
    body_share_by_stage: list[float] = field(default_factory=list)
    body_auc: float | None = None
    guide_body_auc: float | None = None
    random_draws: list[ReidMetrics] = field(default_factory=list)
    occluder_share: float | None = None
    occluder_chance: float | None = None
    stage1_ranking: ReidMetrics | None = None
    occluder_dropped: ReidMetrics | None = None
    sampling_overlap: float | None = None
    sampling_overlap_chance: float | None = None

    def summary(self) -> dict[str, float | None]:
        """Flat numbers (R1 / mAP in 0..1) for logs and reports."""
        out: dict[str, float | None] = {}
        for name in ("predictor", "random", "guide", "stage1_ranking", "occluder_dropped"):
            metrics = getattr(self, name)
            out[f"{name}_R1"] = metrics.rank(1) if metrics is not None else None
            out[f"{name}_mAP"] = metrics.mAP if metrics is not None else None
        draws = [m.rank(1) for m in self.random_draws]
        out.update(
            random_R1_min=min(draws) if draws else None,
            random_R1_max=max(draws) if draws else None,
            spearman=self.spearman,
            **{
                f"spearman_{name.replace('-', '_')}": value
                for name, value in self.other_spearman.items()
            },
            body_share=self.body_share,
            guide_body_share=self.guide_body_share,
            body_chance=self.body_chance,
            **{
                f"body_share_stage{j + 1}": value
                for j, value in enumerate(self.body_share_by_stage)
            },
            body_auc=self.body_auc,
            guide_body_auc=self.guide_body_auc,
            occluder_share=self.occluder_share,
            occluder_chance=self.occluder_chance,
            sampling_overlap=self.sampling_overlap,
            sampling_overlap_chance=self.sampling_overlap_chance,
        )
        return out


def random_decisions(student):
    """Decisions for ``student.forward_masked``: at each stage as many tokens as the eval path
    keeps, chosen uniformly at random among those alive (the baseline of the check)."""

    def decide(stage: int, keep_logit: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        return student.keep_top_scores(stage, torch.rand_like(keep_logit), keep_mask)

    return decide


def score_decisions(student, scores: torch.Tensor):
    """Decisions for ``student.forward_masked``: at each stage the top-k of ``scores`` [B, N]
    (e.g. a teacher's importance: the oracle the predictors would imitate) among the tokens
    still alive."""
    if scores.dim() != 2 or scores.shape[1] != student.config.num_patches:
        raise SureidError(
            f"scores must be [batch, image tokens] = [B, {student.config.num_patches}], got "
            f"{list(scores.shape)}"
        )

    def decide(stage: int, keep_logit: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        return student.keep_top_scores(stage, scores, keep_mask)

    return decide


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``, [B]."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        r = x.float().argsort(dim=1).argsort(dim=1).float()
        return r - r.mean(dim=1, keepdim=True)

    ra, rb = ranks(a), ranks(b)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def auc_rows(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores`` [B, N]: the probability that a positive entry of ``labels`` [B, N]
    (bools) scores higher than a negative one, ties counting one half (the area under the ROC
    curve), [B]; NaN for a row without both kinds."""
    s, y = scores.float(), labels.bool()
    diff = s[:, :, None] - s[:, None, :]  # [B, N, N]: row i's entry j minus entry k
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    pairs = (y[:, :, None] & ~y[:, None, :]).float()
    count = pairs.sum((1, 2))
    auc = (wins * pairs).sum((1, 2)) / count.clamp_min(1)
    return torch.where(count > 0, auc, torch.full_like(auc, float("nan")))


def patch_mask_flags(masks: torch.Tensor, config) -> torch.Tensor:
    """[B, N] bools: which patches of the model's grid are mostly (over half) in each mask of
    ``masks`` ([B, H, W], non-zero = in it, at the model's input size), patches cut as the
    patch embedding cuts them."""
    share = F.avg_pool2d(
        (masks[:, None] != 0).float(), kernel_size=config.patch_size, stride=config.stride_size
    )
    return share.flatten(1) > 0.5


def patch_body_flags(mask, config) -> torch.Tensor:
    """[N] bools: which patches of the model's grid are mostly (over half) in ``mask``: the
    visible body (or, given an occluder mask, the occluder).

    ``mask``: at any size (a path to a black/white PNG, a PIL image or an [H, W] array;
    non-zero = in it), resized to the model's input as the image is.
    """
    from PIL import Image

    if isinstance(mask, str | bytes) or hasattr(mask, "__fspath__"):
        with Image.open(mask) as im:
            mask = im.convert("L")
    if not isinstance(mask, Image.Image):
        mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    h, w = config.image_size
    mask = mask.convert("L").resize((w, h), Image.Resampling.NEAREST)
    return patch_mask_flags(torch.from_numpy(np.asarray(mask) > 0)[None], config)[0]


def check_token_selection(
    student,
    query,
    gallery,
    guide=None,
    protocol: str = "market",
    *,
    body_masks: Sequence | str | None = "auto",
    importance: str = "rollout",
    batch_size: int = 64,
    device="auto",
    seed: int = 0,
    random_draws: int = 5,
    other_importances: Sequence[str] = ("attention-norm",),
    occluder_masks: Mapping[str, Sequence] | str | None = "auto",
) -> TokenSelectionCheck:
    """Measure what an HTS student's predictors learned (see ``TokenSelectionCheck``).

    ``query`` / ``gallery``: splits as for :func:`evaluate_model`. ``guide``: a dense model
    (the teacher) whose token importance (``importance``: "rollout" or "cls-attention", see
    ``modeling_sureid.token_importance``) is the oracle and the reference of the Spearman
    correlation; None skips both. ``body_masks``: one visible-body mask per query image (paths,
    images or arrays), ``"auto"`` = the query's ``body_mask_path`` column when it has one (the
    synthetic set), None = skip. Random keeping is drawn ``random_draws`` times (its metrics are
    the mean over the draws) from a generator seeded with ``seed``. ``other_importances``: more
    of the guide's importances to correlate the stage-1 keep score with (``other_spearman``).
    ``occluder_masks``: ``{"query": [...], "gallery": [...]}``, one occluder mask per image of
    each split, ``"auto"`` = both splits' ``occluder_mask_path`` columns when they have them
    (the synthetic set), None = skip the occluder measures.
    """
    config = student.config
    if not getattr(config, "hts_enabled", False):
        raise SureidError("check_token_selection needs an HTS student (keep_rate < 1)")
    if isinstance(body_masks, str) and body_masks == "auto":
        columns = getattr(query, "column_names", [])
        body_masks = query["body_mask_path"] if "body_mask_path" in columns else None
    if body_masks is not None and len(body_masks) != len(query):
        raise ValueError(f"{len(body_masks)} body masks for {len(query)} query images")
    occluder_masks = _occluder_masks(occluder_masks, query, gallery)
    unknown = [name for name in other_importances if name not in IMPORTANCE_METHODS]
    if unknown or importance not in IMPORTANCE_METHODS:
        raise ValueError(
            f"unknown token importance {unknown or importance!r}: use one of "
            f"{sorted(IMPORTANCE_METHODS)}"
        )
    if int(random_draws) < 1:
        raise ValueError(f"random_draws must be at least 1, got {random_draws}")
    dev = resolve_device(device)
    processor = SureidImageProcessor.from_model_config(config)
    models = [m for m in (student, guide) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.to(dev).eval()
    others = [name for name in other_importances if name != importance]
    tally = _SelectionTally(
        student, guide, importance, body_masks, int(random_draws), others, occluder_masks
    )
    try:
        with torch.inference_mode(), _forked_rng(dev):
            torch.manual_seed(seed)
            for split_name, split in (("query", query), ("gallery", gallery)):
                for indices, pixels in iter_pixel_batches(split, processor, batch_size):
                    tally.add(split_name, indices, pixels.to(dev))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return tally.result(query, gallery, protocol)


def _forked_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU and ``device`` alone (the device's own index, or
    its type's current one), so random draws inside leave every outside draw as it was."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _occluder_masks(masks, query, gallery) -> dict[str, Sequence] | None:
    """``check_token_selection``'s ``occluder_masks`` as ``{"query": ..., "gallery": ...}``
    (one per image of each split), or None."""
    if isinstance(masks, str):
        if masks != "auto":
            raise ValueError(f'occluder_masks must be "auto", None or a mapping, got {masks!r}')
        splits = {"query": query, "gallery": gallery}
        if not all(
            "occluder_mask_path" in getattr(split, "column_names", []) for split in splits.values()
        ):
            return None
        return {name: split["occluder_mask_path"] for name, split in splits.items()}
    if masks is None:
        return None
    for name, split in (("query", query), ("gallery", gallery)):
        if name not in masks or len(masks[name]) != len(split):
            given = len(masks[name]) if name in masks else "no"
            raise ValueError(
                f"occluder_masks needs one mask per {name} image: {given} masks for "
                f"{len(split)} images"
            )
    return {"query": masks["query"], "gallery": masks["gallery"]}


class _SelectionTally:
    """What :func:`check_token_selection` collects batch by batch: the embeddings of each way
    of keeping tokens, per split, and on the query split the rank correlations and the body and
    occluder shares."""

    def __init__(
        self,
        student,
        guide,
        importance: str,
        body_masks,
        random_draws: int = 1,
        others=(),
        occluder_masks=None,
    ):
        self.student, self.guide, self.importance = student, guide, importance
        self.other_spearman: dict[str, list[torch.Tensor]] = {name: [] for name in others}
        self.body_masks, self.occluder_masks = body_masks, occluder_masks
        self.random_names = [f"random{r}" for r in range(random_draws)]
        self.feats = {
            name: {"query": [], "gallery": []}
            for name in (
                "predictor",
                *self.random_names,
                "guide",
                "stage1_ranking",
                "occluder_dropped",
            )
        }
        self.occluder_share: list[float] = []
        self.occluder_chance: list[float] = []
        self.spearman: list[torch.Tensor] = []
        self.body_share: list[float] = []
        self.stage_body_share: list[list[float]] = []
        self.guide_body_share: list[float] = []
        self.body_chance: list[float] = []
        self.body_auc: list[torch.Tensor] = []
        self.guide_body_auc: list[torch.Tensor] = []
        self.sampling_overlap: list[torch.Tensor] = []
        self.sampling_chance: list[torch.Tensor] = []

    def add(self, split_name: str, indices: torch.Tensor, pixels: torch.Tensor) -> None:
        """One batch: the student as it runs, with random keeping, and (with a guide) with the
        guide's top-k; then, for queries, what its own top-k keeps."""
        student, config = self.student, self.student.config
        out = {"predictor": student(pixels)}
        for name in self.random_names:
            out[name] = student.forward_masked(pixels, decide=random_decisions(student))
        scores = None

        def guide_importance(method: str) -> torch.Tensor:
            return resample_importance(
                token_importance(self.guide, pixels, method),
                self.guide.config.grid_size,
                config.grid_size,
            )

        if self.guide is not None:
            scores = guide_importance(self.importance)
            out["guide"] = student.forward_masked(pixels, decide=score_decisions(student, scores))
        masked = None
        if self.occluder_masks is not None:
            masked = student.forward_masked(pixels, decide=student.keep_topk)
            occluder = self._occluder_flags(split_name, indices).to(pixels.device)
            out.update(self._occluder_runs(pixels, masked.keep_logits[0], occluder))
            if split_name == "query":
                kept = masked.keep_masks[-1] > 0
                for row in range(len(indices)):
                    self.occluder_share.append(float(occluder[row][kept[row]].float().mean()))
                    self.occluder_chance.append(float(occluder[row].float().mean()))
        for name, o in out.items():
            self.feats[name][split_name].append(F.normalize(o.embeddings.float(), dim=1))
        if split_name != "query":
            return
        if masked is None:
            masked = student.forward_masked(pixels, decide=student.keep_topk)
        self._add_sampling_overlap(pixels, masked.keep_masks[-1] > 0)
        if scores is not None:
            self.spearman.append(spearman_rows(masked.keep_logits[0], scores))
            for method, values in self.other_spearman.items():
                values.append(spearman_rows(masked.keep_logits[0], guide_importance(method)))
        if self.body_masks is not None:
            oracle = out["guide"].keep_masks[-1] > 0 if scores is not None else None
            flags = self._add_body_shares(indices, masked.keep_masks, oracle)
            self.body_auc.append(auc_rows(masked.keep_logits[0], flags))
            if scores is not None:
                self.guide_body_auc.append(auc_rows(scores, flags))

    def _add_sampling_overlap(self, pixels: torch.Tensor, topk: torch.Tensor) -> None:
        """Per query: the share of the last stage's top-k (``topk`` [B, N] bools) that a draw
        of the training sampling keeps too, and that share's chance level. The draw runs on a
        forked random state, so the check's other draws are those it makes without it."""
        student = self.student
        with _forked_rng(pixels.device):
            sampled = student.forward_masked(pixels).keep_masks[-1]
        sampled = sampled > 0
        self.sampling_overlap.append((sampled & topk).sum(1) / topk.sum(1).clamp_min(1))
        self.sampling_chance.append(sampled.sum(1) / sampled.shape[1])

    def _occluder_flags(self, split_name: str, indices: torch.Tensor) -> torch.Tensor:
        """[B, N] bools: the patches of the batch's images that are mostly occluder."""
        masks = self.occluder_masks[split_name]
        return torch.stack(
            [patch_body_flags(masks[i], self.student.config) for i in indices.tolist()]
        )

    def _occluder_runs(self, pixels, stage1: torch.Tensor, occluder: torch.Tensor) -> dict:
        """The student with the stage-1 keep score as a fixed ranking at every stage, and with
        the same ranking but the occluder's patches last."""
        student, n = self.student, stage1.shape[-1]
        ranks = stage1.float().argsort(dim=-1).argsort(dim=-1).float()  # 0 .. N-1, best last
        return {
            "stage1_ranking": student.forward_masked(
                pixels, decide=score_decisions(student, ranks)
            ),
            "occluder_dropped": student.forward_masked(
                pixels, decide=score_decisions(student, ranks - n * occluder.float())
            ),
        }

    def _add_body_shares(self, indices: torch.Tensor, keep_masks, oracle) -> torch.Tensor:
        """Per query: the share of body patches among all patches (chance), among the kept
        ones after each stage (``keep_masks``), and among the guide's top-k (``oracle``, None
        without a guide). Returns the batch's body flags, [B, N]."""
        config = self.student.config
        stages = [mask > 0 for mask in keep_masks]
        batch_flags = []
        for row, i in enumerate(indices.tolist()):
            flags = patch_body_flags(self.body_masks[i], config).to(stages[0].device)
            batch_flags.append(flags)
            self.body_chance.append(float(flags.float().mean()))
            by_stage = [float(flags[kept[row]].float().mean()) for kept in stages]
            self.stage_body_share.append(by_stage)
            self.body_share.append(by_stage[-1])
            if oracle is not None:
                self.guide_body_share.append(float(flags[oracle[row]].float().mean()))
        return torch.stack(batch_flags)

    def result(self, query, gallery, protocol: str) -> TokenSelectionCheck:
        results = {}
        for name, by_split in self.feats.items():
            if by_split["query"]:
                results[name] = evaluate_splits(
                    torch.cat(by_split["query"]).cpu(),
                    torch.cat(by_split["gallery"]).cpu(),
                    query,
                    gallery,
                    protocol,
                )

        def mean(values: list[float]) -> float | None:
            return float(np.mean(values)) if values else None

        def row_mean(values: list[torch.Tensor]) -> float | None:
            if not values:
                return None
            rows = torch.cat(values)
            rows = rows[~rows.isnan()]
            return float(rows.mean()) if len(rows) else None

        draws = [results[name] for name in self.random_names]
        return TokenSelectionCheck(
            predictor=results["predictor"],
            random=_mean_metrics(draws),
            guide=results.get("guide"),
            spearman=row_mean(self.spearman),
            other_spearman={
                name: row_mean(values) for name, values in self.other_spearman.items() if values
            },
            body_share=mean(self.body_share),
            guide_body_share=mean(self.guide_body_share),
            body_chance=mean(self.body_chance),
            body_share_by_stage=[float(v) for v in np.mean(self.stage_body_share, axis=0)]
            if self.stage_body_share
            else [],
            body_auc=row_mean(self.body_auc),
            guide_body_auc=row_mean(self.guide_body_auc),
            random_draws=draws,
            occluder_share=mean(self.occluder_share),
            occluder_chance=mean(self.occluder_chance),
            stage1_ranking=results.get("stage1_ranking"),
            occluder_dropped=results.get("occluder_dropped"),
            sampling_overlap=row_mean(self.sampling_overlap),
            sampling_overlap_chance=row_mean(self.sampling_chance),
        )


def _mean_metrics(draws: list[ReidMetrics]) -> ReidMetrics:
    """One ReidMetrics whose CMC, mAP and mINP are the mean over ``draws`` (the same splits)."""
    if len(draws) == 1:
        return draws[0]
    return replace(
        draws[0],
        cmc=[float(v) for v in np.mean([d.cmc for d in draws], axis=0)],
        mAP=float(np.mean([d.mAP for d in draws])),
        mINP=float(np.mean([d.mINP for d in draws])),
    )
