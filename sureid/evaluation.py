"""ReID evaluation: CMC, mAP and mINP under each data set's protocol, and k-reciprocal re-ranking.

Pure torch: features in, numbers out. Rules (the same as torchreid / TransReID, stated here
because the numbers depend on them):

- **Ranking and ties.** Each query's gallery is sorted by distance with a *stable* sort, so
  entries at exactly the same distance keep their gallery order (the lower gallery index ranks
  first). Deterministic, and the same rule in every code path (chunked or re-ranked).
- **Protocol ``"market"``** (Market-1501, DukeMTMC-reID, Occluded-Duke, the synthetic set): gallery
  entries with the query's pid *and* the query's camera are removed from that query's ranking
  (they are neither hits nor misses).
- **Protocol ``"cross"``** (Occluded-REID, Partial-REID: queries and gallery come from different
  image sets): no camera filtering.
- **Junk** (pid -1, Market-1501's junk images; ``junk_pids``): removed from every ranking, under
  both protocols; it never counts. A query with a junk pid has no valid match.
- **Distractors** (pid 0 in the Market-1501 gallery): ordinary gallery entries; no query has
  pid 0, so they only ever count as wrong matches.
- **Queries without a valid match** (no gallery entry of their pid left after filtering) are left
  out of every average and counted in ``ReidMetrics.num_no_match``.
- **CMC** at rank k: fraction of queries whose first match is within the top k (after filtering).
  **AP**: mean over the query's matches of the precision at each match's rank. **INP** (Ye et
  al. 2021): matches / rank of the last (hardest) match.

Distances are computed for ``chunk_size`` queries at a time and ranked at once, so memory stays
at about ``50 bytes x chunk_size x num_gallery`` beyond the features (measured: 260 MB for 256 x
20k) instead of a full query x gallery matrix. Re-ranking needs the full ``(Q+G)^2`` matrix; see
:func:`re_rank`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_sureid import SureidError

PROTOCOLS = ("market", "cross")
METRICS = ("cosine", "euclidean")


def protocol_for_dataset(name: str) -> str:
    """The evaluation protocol of a named data set ("market" or "cross"); see the module doc.

    Names and aliases are those ``sureid.data.load_reid_dataset`` accepts: both read the data
    set table (``sureid.data.datasets.SPECS``) through ``canonical_dataset_name``, and an
    unknown name raises its error (``unknown data set name ...; expected one of: ...``), the
    same words ``load_reid_dataset`` and the command line's --dataset use. Features of a data
    set of your own: pass ``protocol`` to :func:`evaluate_reid` yourself.
    """
    from .data.datasets import SPECS, canonical_dataset_name  # the data layer loads lazily

    return SPECS[canonical_dataset_name(name)].protocol


@dataclass
class ReidMetrics:
    """What :func:`evaluate_reid` returns. ``cmc[k-1]`` is the rank-k accuracy (0..1)."""

    cmc: list[float]
    mAP: float
    mINP: float
    num_query: int
    num_gallery: int
    num_valid_query: int
    num_no_match: int
    protocol: str
    metric: str
    rerank: bool

    def rank(self, k: int) -> float:
        """Rank-k accuracy (CMC at k, 1-based); the last value beyond ``max_rank``."""
        if k < 1:
            raise ValueError(f"rank k must be >= 1, got {k}")
        if not self.cmc:
            return float("nan")
        return self.cmc[min(k, len(self.cmc)) - 1]

    def to_dict(self) -> dict:
        """A JSON-ready dict (with R1 / R5 / R10 spelled out for tables); NaN becomes None."""
        out = asdict(self)
        out.update({"R1": self.rank(1), "R5": self.rank(5), "R10": self.rank(10)})
        return _json_ready(out)

    def __str__(self) -> str:
        return (
            f"R1 {100 * self.rank(1):.1f}  R5 {100 * self.rank(5):.1f}  "
            f"R10 {100 * self.rank(10):.1f}  mAP {100 * self.mAP:.1f}  mINP {100 * self.mINP:.1f}"
            f"  ({self.num_valid_query}/{self.num_query} queries with a match, "
            f"{self.num_gallery} gallery)"
        )


def _json_ready(value):
    """NaN / inf -> None, recursively: the metrics have no value when no query has a match,
    and ``json.dump`` would write NaN, which is not JSON (other readers reject the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _as_tensor(x, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def _check_finite(features: torch.Tensor, name: str) -> None:
    """Refuse NaN / inf feature rows: ranked anyway, they give believable but meaningless numbers."""
    bad = (~torch.isfinite(features)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise SureidError(
            f"{name} rows {shown} ({len(bad)} of {len(features)}) contain NaN or inf: the model "
            "gave no usable embedding for them (a diverged or corrupt checkpoint?); evaluating "
            "them would give meaningless numbers. Check the model, or drop those rows and their ids"
        )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def pairwise_distance(
    query: torch.Tensor, gallery: torch.Tensor, metric: str = "cosine"
) -> torch.Tensor:
    """Distances [Q, G] in float32: ``1 - cos`` ("cosine") or the L2 distance ("euclidean").

    Holds the whole matrix; :func:`evaluate_reid` calls it on chunks of queries.
    """
    _check_metric(metric)
    q, g = query.float(), gallery.float()
    if metric == "cosine":
        return 1.0 - F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    # ||q||^2 + ||g||^2 - 2 q.g, clamped at 0 against rounding, then the square root.
    d2 = (q * q).sum(1, keepdim=True) + (g * g).sum(1)[None] - 2.0 * (q @ g.T)
    return d2.clamp_min_(0).sqrt_()


class _Accumulator:
    """Sums per-query CMC / AP / INP over chunks of ranked distances."""

    def __init__(self, max_rank: int, device: torch.device):
        self.max_rank = max_rank
        self.cmc = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap = 0.0
        self.inp = 0.0
        self.valid = 0

    def add(
        self,
        dist: torch.Tensor,  # [c, G]
        q_pids: torch.Tensor,
        q_cams: torch.Tensor,
        g_pids: torch.Tensor,
        g_cams: torch.Tensor,
        junk: torch.Tensor,  # [G] bool: gallery entries that never count
        same_camera_filter: bool,
    ) -> None:
        order = torch.sort(dist, dim=1, stable=True).indices  # ties: gallery order
        pids = g_pids[order]
        match = pids == q_pids[:, None]
        keep = ~junk[order]
        if same_camera_filter:
            keep &= ~(match & (g_cams[order] == q_cams[:, None]))
        match &= keep
        del pids
        # 1-based rank of each entry among the kept ones (meaningful where keep is True).
        rank = keep.cumsum(1, dtype=torch.int32)
        num_pos = match.sum(1)
        valid = num_pos > 0
        if not bool(valid.any()):
            return
        match, rank, num_pos = match[valid], rank[valid], num_pos[valid].double()
        big = torch.iinfo(torch.int32).max
        first = torch.where(match, rank, big).amin(1)  # rank of the first match
        last = torch.where(match, rank, 0).amax(1)  # rank of the last (hardest) match
        hits = match.cumsum(1, dtype=torch.int32)  # matches up to and including each entry
        precision = torch.where(match, hits.double() / rank.double(), 0.0)
        self.ap += float((precision.sum(1) / num_pos).sum())
        self.inp += float((num_pos / last.double()).sum())
        ranks = torch.arange(1, self.max_rank + 1, device=first.device)
        self.cmc += (first[:, None] <= ranks[None]).double().sum(0)
        self.valid += int(valid.sum())

    def result(self) -> tuple[list[float], float, float]:
        if self.valid == 0:
            return [float("nan")] * self.max_rank, float("nan"), float("nan")
        cmc = (self.cmc / self.valid).tolist()
        return cmc, self.ap / self.valid, self.inp / self.valid


def evaluate_reid(
    query_features,
    gallery_features,
    query_pids,
    gallery_pids,
    query_camids=None,
    gallery_camids=None,
    protocol: str = "market",
    max_rank: int = 50,
    metric: str = "cosine",
    rerank: bool = False,
    *,
    chunk_size: int = 256,
    junk_pids: Sequence[int] = (-1,),
    rerank_k1: int = 20,
    rerank_k2: int = 6,
    rerank_lambda: float = 0.3,
    rerank_max_memory_gb: float = 8.0,
) -> ReidMetrics:
    """CMC (ranks 1..max_rank), mAP and mINP of a query set against a gallery.

    Features are [Q, C] / [G, C] tensors or arrays; pids and camids 1-D sequences. ``protocol``:
    "market" (drop same-pid same-camera gallery entries) or "cross" (no camera filtering; camids
    may then be None). ``rerank`` applies k-reciprocal re-ranking (:func:`re_rank`, memory
    ``O((Q+G)^2)``). Queries without a valid match are left out and counted
    (``num_no_match``). Ties and junk / distractor handling: see the module docstring.
    """
    _check_evaluation_settings(protocol, metric, max_rank, chunk_size)
    qf, gf = _feature_pair(query_features, gallery_features)
    q_pids, g_pids, q_cams, g_cams = _id_columns(
        protocol, qf, gf, query_pids, gallery_pids, query_camids, gallery_camids
    )
    junk = torch.isin(g_pids, torch.as_tensor(list(junk_pids), dtype=torch.long, device=qf.device))
    acc = _Accumulator(max_rank, qf.device)
    filt = protocol == "market"
    reranked = None
    if rerank:
        reranked = re_rank(
            qf,
            gf,
            k1=rerank_k1,
            k2=rerank_k2,
            lambda_value=rerank_lambda,
            metric=metric,
            max_memory_gb=rerank_max_memory_gb,
        )
    for s in range(0, len(qf), chunk_size):
        e = s + chunk_size
        dist = reranked[s:e] if reranked is not None else pairwise_distance(qf[s:e], gf, metric)
        acc.add(dist, q_pids[s:e], q_cams[s:e], g_pids, g_cams, junk, filt)
    cmc, mean_ap, mean_inp = acc.result()
    return ReidMetrics(
        cmc=cmc,
        mAP=mean_ap,
        mINP=mean_inp,
        num_query=len(qf),
        num_gallery=len(gf),
        num_valid_query=acc.valid,
        num_no_match=len(qf) - acc.valid,
        protocol=protocol,
        metric=metric,
        rerank=bool(rerank),
    )


def _check_evaluation_settings(protocol: str, metric: str, max_rank: int, chunk_size: int) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"protocol must be 'market' (Market/Duke/Occluded-Duke) or 'cross' "
            f"(Occluded-REID/Partial-REID), got {protocol!r}"
        )
    _check_metric(metric)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _feature_pair(query_features, gallery_features) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features as float32 [Q, C] / [G, C] on the query's device, finite."""
    qf = _as_tensor(query_features, "query_features", torch.float32)
    gf = _as_tensor(gallery_features, "gallery_features", torch.float32)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"query and gallery features must be [Q, C] and [G, C] with the same C, got "
            f"{tuple(qf.shape)} and {tuple(gf.shape)}"
        )
    for name, feats in (("query_features", qf), ("gallery_features", gf)):
        _check_finite(feats, name)
    return qf, gf.to(qf.device)


def _id_columns(
    protocol: str,
    qf: torch.Tensor,
    gf: torch.Tensor,
    query_pids,
    gallery_pids,
    query_camids,
    gallery_camids,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query pids, gallery pids, query camids, gallery camids as long tensors on the features'
    device, one entry per feature row (camids all 0 when not given, allowed under "cross")."""
    device = qf.device
    q_pids = _as_tensor(query_pids, "query_pids", torch.long).to(device)
    g_pids = _as_tensor(gallery_pids, "gallery_pids", torch.long).to(device)
    if protocol == "market":
        if query_camids is None or gallery_camids is None:
            raise ValueError(
                "protocol 'market' needs query_camids and gallery_camids (it drops same-pid "
                "same-camera gallery entries); pass them, or use protocol='cross'"
            )
    q_cams = (
        _as_tensor(query_camids, "query_camids", torch.long).to(device)
        if query_camids is not None
        else torch.zeros_like(q_pids)
    )
    g_cams = (
        _as_tensor(gallery_camids, "gallery_camids", torch.long).to(device)
        if gallery_camids is not None
        else torch.zeros_like(g_pids)
    )
    for name, ids, n in (
        ("query_pids", q_pids, len(qf)),
        ("query_camids", q_cams, len(qf)),
        ("gallery_pids", g_pids, len(gf)),
        ("gallery_camids", g_cams, len(gf)),
    ):
        if ids.ndim != 1 or len(ids) != n:
            raise ValueError(f"{name} must be 1-D with {n} entries, got shape {tuple(ids.shape)}")
    return q_pids, g_pids, q_cams, g_cams


@dataclass
class ModelEvaluation:
    """What :func:`evaluate_model` returns: the metrics and how long extraction took."""

    metrics: ReidMetrics
    num_images: int
    extract_seconds: float
    eval_seconds: float
    device: str
    # on_error="skip": the inputs left out, per split ("query", "gallery")
    skipped: dict[str, list] = field(default_factory=dict)
    # the L2-normalised features that were ranked (for ranked-list pictures, search, ...)
    query_features: torch.Tensor | None = field(default=None, repr=False)
    gallery_features: torch.Tensor | None = field(default=None, repr=False)

    @property
    def images_per_second(self) -> float:
        """Extraction throughput over query + gallery (loading, preprocessing, model)."""
        return self.num_images / self.extract_seconds if self.extract_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        out = self.metrics.to_dict()
        out.update(
            num_images=self.num_images,
            extract_seconds=self.extract_seconds,
            eval_seconds=self.eval_seconds,
            images_per_second=self.images_per_second,
            device=self.device,
        )
        if self.skipped:
            out["skipped"] = {k: [asdict(item) for item in v] for k, v in self.skipped.items()}
        return _json_ready(out)

    def table(self) -> str:
        """The numbers as a small text table (percentages)."""
        m = self.metrics
        head = f"{'R1':>6} {'R5':>6} {'R10':>6} {'mAP':>6} {'mINP':>6} {'query':>7} {'gallery':>8}"
        row = (
            f"{100 * m.rank(1):6.1f} {100 * m.rank(5):6.1f} {100 * m.rank(10):6.1f} "
            f"{100 * m.mAP:6.1f} {100 * m.mINP:6.1f} {m.num_query:7d} {m.num_gallery:8d}"
        )
        notes = [
            f"protocol {m.protocol}, metric {m.metric}, re-ranking {'on' if m.rerank else 'off'}",
            f"{m.num_no_match} of {m.num_query} queries have no valid gallery match (left out)",
            f"extraction: {self.num_images} images in {self.extract_seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s on {self.device}); ranking "
            f"{self.eval_seconds:.1f} s",
        ]
        for split, items in self.skipped.items():
            if items:
                notes.append(f"{len(items)} unreadable {split} images left out of the evaluation")
        return "\n".join([head, row, *notes])


def evaluate_splits(
    query_features, gallery_features, query, gallery, protocol: str = "market", **kwargs
) -> ReidMetrics:
    """:func:`evaluate_reid` with the pids and camids read from the ``query`` / ``gallery``
    splits (``datasets.Dataset`` or dicts with ``pid`` and ``camid`` columns)."""
    return evaluate_reid(
        query_features,
        gallery_features,
        query["pid"],
        gallery["pid"],
        query["camid"],
        gallery["camid"],
        protocol=protocol,
        **kwargs,
    )


def evaluate_model(
    model,
    query,
    gallery,
    protocol: str = "market",
    *,
    max_rank: int = 50,
    metric: str = "cosine",
    rerank: bool = False,
    batch_size: int = 64,
    device="auto",
    num_workers: int | None = None,
    progress: bool = True,
    on_error: str = "raise",
    dtype=None,
    **evaluate_kwargs,
) -> ModelEvaluation:
    """Extract query and gallery features with ``model`` and evaluate them.

    ``query`` / ``gallery``: ``datasets.Dataset`` splits with image, pid and camid columns (as
    ``sureid.data.load_reid_dataset`` makes them). Extraction goes through
    :func:`sureid.extract_features` (errors name unreadable files; ``on_error="skip"`` leaves
    them out of the evaluation and lists them in ``ModelEvaluation.skipped``; ``dtype``: its
    autocast dtype, "auto" / None = the device's default); the rest as
    :func:`evaluate_reid`, which gets ``evaluate_kwargs``.
    """
    import time

    from .inference import extract_features, load_model, resolve_device

    model = load_model(model)
    dev = resolve_device(device)
    _check_id_columns(query, gallery)
    start = time.perf_counter()
    options = dict(batch_size=batch_size, device=dev, num_workers=num_workers, progress=progress)
    options["dtype"] = dtype
    feats = [
        extract_features(model, split, on_error=on_error, **options) for split in (query, gallery)
    ]
    extract_seconds = time.perf_counter() - start
    num_images = len(query) + len(gallery)
    skipped = {}
    if on_error == "skip":  # FeatureResults: evaluate the rows that have features
        skipped = {"query": feats[0].skipped, "gallery": feats[1].skipped}
        query, feats[0] = _rows_with_features("query", query, feats[0])
        gallery, feats[1] = _rows_with_features("gallery", gallery, feats[1])
    start = time.perf_counter()
    metrics = evaluate_splits(
        *feats,
        query,
        gallery,
        protocol,
        max_rank=max_rank,
        metric=metric,
        rerank=rerank,
        **evaluate_kwargs,
    )
    return ModelEvaluation(
        metrics=metrics,
        num_images=num_images,
        extract_seconds=extract_seconds,
        eval_seconds=time.perf_counter() - start,
        device=str(dev),
        skipped=skipped,
        query_features=feats[0],
        gallery_features=feats[1],
    )


def _check_id_columns(query, gallery) -> None:
    for name, split in (("query", query), ("gallery", gallery)):
        missing = {"pid", "camid"} - set(getattr(split, "column_names", []))
        if missing:
            raise ValueError(
                f"the {name} split needs pid and camid columns (missing: {sorted(missing)}); "
                "load it with sureid.data.load_reid_dataset"
            )


def _rows_with_features(name: str, split, result) -> tuple:
    """``on_error="skip"``: ``split`` narrowed to the rows that got features, and those features
    (``result`` is its ``FeatureResult``). Raises when every image of the split was skipped."""
    if result.skipped and not len(result.features):
        first = result.skipped[0]
        raise SureidError(
            f"every {name} image was skipped ({len(result.skipped)} in all; first: "
            f"{first.source}: {first.error}); nothing to evaluate"
        )
    if result.skipped:
        split = split.select(result.indices.tolist())
    return split, result.features


# --------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------

# float32 N x N matrices alive at the peak of re_rank (distances, V, its query expansion or its
# transpose, and the query rows), plus the ~64 MB work chunks of the distance and expansion steps.
_RERANK_MATRICES = 4
_RERANK_WORKSPACE = 2 * 2**26


def rerank_memory_bytes(num_query: int, num_gallery: int) -> int:
    """Approximate peak memory of :func:`re_rank` in bytes: ``16 (Q + G)^2`` + 128 MB."""
    n = num_query + num_gallery
    return _RERANK_MATRICES * 4 * n * n + _RERANK_WORKSPACE


def re_rank(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "cosine",
    max_memory_gb: float = 8.0,
) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017): the re-ranked distances [Q, G].

    Over the N = Q + G images: ``R(i, k1)`` = the k-reciprocal neighbours of i (j in i's top
    k1+1 and i in j's), expanded by the ``R(j, k1/2)`` of its members that share more than 2/3
    of their set with it; ``V_i`` = Gaussian-kernel weights ``exp(-d(i, j))`` over that set,
    normalised to sum 1; local query expansion averages ``V`` over i's top k2; the Jaccard
    distance is ``1 - sum min(V_p, V_g) / sum max(V_p, V_g)``; the result is
    ``(1 - lambda) d_J + lambda d`` with ``d`` each row's distances divided by its maximum.

    Memory is ``O((Q+G)^2)``: about ``16 (Q+G)^2`` bytes + 128 MB (:func:`rerank_memory_bytes`;
    6.0 GB for Occluded-Duke's 19,871 test images). Above ``max_memory_gb`` it raises a
    :class:`~sureid.SureidError` naming the estimate and the limit instead of running out of
    memory. Time: Python loops over the N images (seconds per thousand images).
    """
    _check_metric(metric)
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re-ranking lambda must be in [0, 1], got {lambda_value}")
    q = _as_tensor(query_features, "query_features", torch.float32)
    g = _as_tensor(gallery_features, "gallery_features", torch.float32).to(q.device)
    _check_rerank_memory(len(q), len(g), max_memory_gb)
    num_q = len(q)
    dist = _normalised_distances(torch.cat([q, g]), metric)
    kk = min(k1 + 1, len(dist))
    rank = _top_ranks(dist, kk)
    rows, cols = _expanded_reciprocal_sets(rank.cpu().numpy(), k1, kk)
    V = _neighbour_weights(dist, rows, cols)
    del rows, cols
    if k2 > 1:
        V = _local_query_expansion(V, rank, min(k2, kk))
    # The Jaccard step reads only the query rows of V and its transpose: V itself goes.
    V_query, V_t = V[:num_q].clone(), V.T.contiguous()
    del V
    jaccard = _jaccard_distances(V_query, V_t)
    del V_query, V_t
    final = (1.0 - lambda_value) * jaccard[:, num_q:] + lambda_value * dist[:num_q, num_q:]
    return final.contiguous()


def _check_rerank_memory(num_q: int, num_g: int, max_memory_gb: float) -> None:
    need, n = rerank_memory_bytes(num_q, num_g), num_q + num_g
    if need > max_memory_gb * 2**30:
        raise SureidError(
            f"re-ranking {num_q} queries x {num_g} gallery images needs about "
            f"{need / 2**30:.1f} GB (it holds (Q+G)^2 = {n}^2 distance matrices); the limit is "
            f"{max_memory_gb:g} GB. Raise rerank_max_memory_gb (--rerank-max-memory-gb) if the "
            "machine has the memory, or evaluate without re-ranking."
        )


def _row_step(n: int) -> int:
    """Rows per chunk of an N x N step, so that each chunk holds about 2^24 values (64 MB)."""
    return max(1, 2**24 // max(n, 1))


def _normalised_distances(feats: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances over all N images [N, N], each row divided by its maximum.

    Filled in row chunks (no N x N temporaries). The reference code uses squared L2 distances;
    for "cosine", 1 - cos is half the squared L2 distance of the normalised features, which the
    row normalisation makes the same thing. (The reference code divides by the column maxima of
    the symmetric matrix and transposes, which is the same as dividing each row by its maximum.)
    """
    n = len(feats)
    dist = torch.empty(n, n, dtype=torch.float32, device=feats.device)
    step = _row_step(n)
    for s in range(0, n, step):
        d = pairwise_distance(feats[s : s + step], feats, metric)
        dist[s : s + step] = d if metric == "cosine" else d.square_()
    dist.clamp_min_(0)
    dist /= dist.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return dist


def _top_ranks(dist: torch.Tensor, kk: int) -> torch.Tensor:
    """Each image's ``kk`` nearest images [N, kk] (itself first), by stable sort (deterministic
    ties), in row chunks."""
    n = len(dist)
    rank = torch.empty(n, kk, dtype=torch.long, device=dist.device)
    step = _row_step(n)
    for s in range(0, n, step):
        rank[s : s + step] = torch.sort(dist[s : s + step], dim=1, stable=True).indices[:, :kk]
    return rank


def _expanded_reciprocal_sets(
    initial_rank: np.ndarray, k1: int, kk: int
) -> tuple[list[int], list[int]]:
    """Every image's k1-reciprocal set, expanded by its members' k1/2-reciprocal sets that share
    more than 2/3 of their members with it, as (row, column) index lists of the pairs."""
    n = len(initial_rank)
    half = min(int(round(k1 / 2)) + 1, n)

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = initial_rank[i, :k]
        backward = initial_rank[forward, :k]
        return forward[(backward == i).any(axis=1)]

    # Python sets: these are ~10 elements each, where numpy's set routines cost more than they
    # save.
    half_sets = [reciprocal(i, half).tolist() for i in range(n)]
    rows, cols = [], []
    for i in range(n):
        r = reciprocal(i, kk).tolist()
        members = set(r)
        expansion = set(r)
        for candidate in r:
            c_set = half_sets[candidate]
            if sum(j in members for j in c_set) > 2.0 / 3.0 * len(c_set):
                expansion.update(c_set)
        rows.extend([i] * len(expansion))
        cols.extend(sorted(expansion))
    return rows, cols


def _neighbour_weights(dist: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """``V`` [N, N]: Gaussian-kernel weights ``exp(-d(i, j))`` over each row's expanded set
    (the (rows, cols) pairs), normalised to sum 1 per row; zero elsewhere."""
    n, device = len(dist), dist.device
    row_t = torch.tensor(rows, dtype=torch.long, device=device)
    col_t = torch.tensor(cols, dtype=torch.long, device=device)
    weight = torch.exp(-dist[row_t, col_t])
    total = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, row_t, weight)
    V = torch.zeros(n, n, dtype=torch.float32, device=device)
    V[row_t, col_t] = weight / total[row_t]
    return V


def _local_query_expansion(V: torch.Tensor, rank: torch.Tensor, k2: int) -> torch.Tensor:
    """``V`` averaged over each image's top ``k2`` (itself included), in row chunks."""
    V_qe = torch.empty_like(V)
    step = max(1, _row_step(len(V)) // k2)
    for s in range(0, len(V), step):
        V_qe[s : s + step] = V[rank[s : s + step, :k2]].mean(dim=1)
    return V_qe


def _jaccard_distances(V_query: torch.Tensor, V_t: torch.Tensor) -> torch.Tensor:
    """Jaccard distance [Q, N] between each query (``V_query``, the first Q rows of ``V``) and
    every image (``V_t``, the transpose of ``V``).

    The sum of minima over the support of the query's ``V`` row (``V`` is sparse: a few dozen
    to a few hundred non-zeros per row), and ``sum max = 2 - sum min`` as rows sum to 1. The
    transpose makes the per-query gather read whole rows.
    """
    num_q = len(V_query)
    jaccard = torch.empty(num_q, V_t.shape[1], dtype=torch.float32, device=V_t.device)
    for i in range(num_q):
        support = V_query[i].nonzero().squeeze(1)
        inter = torch.minimum(V_query[i, support][:, None], V_t[support]).sum(0)
        jaccard[i] = 1.0 - inter / (2.0 - inter)
    return jaccard
