"""Indexes for large galleries: faiss beyond exact search, built from a saved gallery.

- :class:`AnnIndex`: ``AnnIndex.build(features, ids, type=...)`` or
  ``AnnIndex.from_gallery(dir, type=...)`` (a folder written by :meth:`GalleryIndex.save`,
  ``sureid extract``); ``search(query, k, nprobe=, ef_search=)`` gives a
  :class:`~sureid.gallery.SearchResult`; ``save(dir)`` / ``AnnIndex.load(dir)``.
- Types (docs/inference.md has the table of which to choose by gallery size and memory):
  ``"flat"`` exact inner product (4 bytes per channel); ``"ivfpq"`` an inverted file of
  ``nlist`` lists with 4-bit product-quantised codes scanned with SIMD (``pq_m`` sub-quantisers,
  ``pq_m / 2`` bytes), whose ``k * k_factor`` best candidates are re-ranked on 8-bit
  scalar-quantised vectors (``IVF{nlist},PQ{m}x4fs,Refine(SQ8)``; 8-bit PQ trains ~40x slower
  and scans slower for no recall gain after the re-ranking); ``"hnsw"`` a HNSW graph (``hnsw_m`` links) over 8-bit scalar-quantised
  vectors (``HNSW{m},SQ8``). All use the inner product: cosine on L2-normalised features.
- The folder: ``index.faiss`` (faiss's own file), ``ids.npy`` (the ids as one numpy column:
  int64 when all ids are integers, else unicode strings) and ``index.json`` (type, parameters,
  dim, count, metric, the model that made the features).

Needs faiss (``pip install sureid[faiss]`` or ``pip install faiss-cpu``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration_sureid import SureidError
from .gallery import GalleryIndex, SearchResult, _import_faiss
from .permissions import give_umask_permissions

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
INDEX_META = "index.json"
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
MIN_PER_LIST = 39  # faiss's k-means wants at least 39 training vectors per list
MIN_PQ_TRAIN = 256  # the PQ's k-means (16 centroids per sub-quantiser) wants a few hundred
MAX_TRAIN = 100_000
ADD_CHUNK = 50_000


@dataclass
class IndexParams:
    """The index's parameters (saved in ``index.json``). ``nprobe``, ``ef_search`` and
    ``k_factor`` are search-time defaults, overridable per search."""

    nlist: int | None = None  # ivfpq: inverted lists
    pq_m: int | None = None  # ivfpq: 4-bit PQ sub-quantisers (pq_m / 2 bytes per code)
    k_factor: int | None = None  # ivfpq: candidates re-ranked on SQ8 = k * k_factor
    nprobe: int | None = None  # ivfpq: lists visited per query
    hnsw_m: int | None = None  # hnsw: links per node
    ef_construction: int | None = None  # hnsw: candidate list while building
    ef_search: int | None = None  # hnsw: candidate list while searching
    train_size: int | None = None  # ivfpq: vectors the quantisers were trained on
    seed: int = 0


def default_nlist(n: int) -> int:
    """About 4 * sqrt(n) lists (a power of two), and at most n / 39 (k-means' minimum)."""
    target = max(1, int(4 * n**0.5))
    nlist = 1 << (target.bit_length() - 1)
    while nlist > 1 and nlist * MIN_PER_LIST > n:
        nlist //= 2
    return nlist


def _resolve_params(kind: str, n: int, dim: int, params: IndexParams) -> IndexParams:
    """Fill the defaults of ``kind`` and check the values against the gallery."""
    if kind not in INDEX_TYPES:
        raise SureidError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")
    p = IndexParams(seed=params.seed)
    if kind == "ivfpq":
        p.nlist = params.nlist or default_nlist(n)
        p.pq_m = params.pq_m or max(1, dim // 4)
        p.k_factor = params.k_factor or 8
        p.nprobe = params.nprobe or max(8, p.nlist // 16)
        p.train_size = min(n, params.train_size or max(50 * p.nlist, MAX_TRAIN))
        _check_ivfpq(n, dim, p)
    elif kind == "hnsw":
        p.train_size = min(n, params.train_size or MAX_TRAIN)  # the SQ8 ranges
        p.hnsw_m = params.hnsw_m or 32
        p.ef_construction = params.ef_construction or 40
        p.ef_search = params.ef_search or 64
    return p


def _check_ivfpq(n: int, dim: int, p: IndexParams) -> None:
    if dim % p.pq_m:
        raise SureidError(
            f"pq_m={p.pq_m} does not divide the feature width {dim}; pass a divisor of {dim} "
            f"(e.g. --pq-m {max(1, dim // 4)}, 4 channels per sub-quantiser)"
        )
    need = max(MIN_PER_LIST * p.nlist, MIN_PQ_TRAIN)
    if p.train_size < need:
        raise SureidError(
            f"too few vectors to train ivfpq: nlist={p.nlist} lists need at least "
            f"{MIN_PER_LIST} x {p.nlist} = {MIN_PER_LIST * p.nlist} training vectors (and the PQ "
            f"at least {MIN_PQ_TRAIN}), but {p.train_size} are used (the gallery has {n}); "
            f"pass a smaller nlist (--nlist {default_nlist(n)} fits), or use type 'hnsw' or "
            "'flat' for a gallery this small"
        )


def _factory(kind: str, dim: int, p: IndexParams):
    faiss = _import_faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivfpq":
        spec = f"IVF{p.nlist},PQ{p.pq_m}x4fs,Refine(SQ8)"
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    index = faiss.index_factory(dim, f"HNSW{p.hnsw_m},SQ8", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = p.ef_construction
    return index


def _ids_column(ids: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """The ids as one numpy column: int64 when all are integers, else unicode strings."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    column = np.asarray(ids)
    if len(column) != n:
        raise SureidError(f"got {len(column)} ids for {n} feature rows")
    if column.dtype.kind in "iu":
        return column.astype(np.int64)
    if column.dtype.kind == "U":
        return column
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in column):
        return column.astype(np.int64)
    return column.astype(str)  # mixed ids are kept as their text


def _as_float32(x: torch.Tensor | np.ndarray, normalise: bool) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x, dtype=np.float32)
    if normalise:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec", disable=not show, file=sys.stderr)


def _train(index, features: np.ndarray, p: IndexParams, show: bool) -> None:
    """Train the quantisers (IVF + PQ, or SQ8's ranges) on a seeded sample of the gallery."""
    rng = np.random.default_rng(p.seed)
    n = len(features)
    rows = np.sort(rng.choice(n, size=p.train_size, replace=False)) if p.train_size < n else None
    sample = features if rows is None else features[rows]
    if show:
        print(f"training the quantisers on {len(sample)} vectors ...", file=sys.stderr)
    if p.nlist:
        _import_faiss().extract_index_ivf(index).cp.seed = p.seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


class AnnIndex:
    """A faiss index over gallery features, with the gallery's ids and records.

    Build it with :meth:`build` (features + ids) or :meth:`from_gallery` (a saved gallery);
    ``search`` returns the ``k`` best per query (highest inner product first; cosine for
    L2-normalised features). An IVF search that finds fewer than ``k`` candidates pads with
    index -1, id None and score -inf.
    """

    def __init__(self, index, ids: np.ndarray, kind: str, params: IndexParams, **records):
        self.index = index
        self.ids = ids
        self.type = kind
        self.params = params
        self.metric = records.get("metric", "cosine")
        self.model = records.get("model")
        self.dim = int(index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return f"AnnIndex({len(self)} entries, dim={self.dim}, type={self.type!r})"

    @classmethod
    def build(
        cls,
        features: torch.Tensor | np.ndarray,
        ids: Sequence[Any] | np.ndarray | None = None,
        type: str = "ivfpq",  # noqa: A002 - the word users know
        params: IndexParams | None = None,
        *,
        metric: str = "cosine",
        model: str | None = None,
        progress: bool = False,
        chunk_size: int = ADD_CHUNK,
    ) -> AnnIndex:
        """An index of ``type`` over ``features`` [N, C] (L2-normalised when metric is cosine)."""
        x = _as_float32(features, normalise=metric == "cosine")
        n, dim = x.shape
        if n == 0:
            raise SureidError("the gallery is empty; there is nothing to index")
        p = _resolve_params(type, n, dim, params or IndexParams())
        index = _factory(type, dim, p)
        if type != "flat":
            _train(index, x, p, progress)
        with _progress(n, f"adding to {type}", progress) as bar:
            for start in range(0, n, chunk_size):
                index.add(x[start : start + chunk_size])
                bar.update(min(chunk_size, n - start))
        return cls(index, _ids_column(ids, n), type, p, metric=metric, model=model)

    @classmethod
    def from_gallery(cls, directory: str | os.PathLike, type: str = "ivfpq", **kwargs) -> AnnIndex:  # noqa: A002
        """Index a gallery saved by :meth:`GalleryIndex.save` (``sureid extract``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"gallery folder {directory} not found: pass the folder written by sureid "
                "extract (or GalleryIndex.save)"
            )
        if type not in INDEX_TYPES:  # before reading a large gallery
            _resolve_params(type, 0, 0, IndexParams())
        gallery = GalleryIndex.load(directory)
        kwargs.setdefault("model", gallery.model)
        return cls.build(
            gallery.features.numpy(), gallery.ids, type, metric=gallery.metric, **kwargs
        )

    def _search_params(self, k: int, nprobe: int | None, ef_search: int | None):
        faiss = _import_faiss()
        p = self.params
        if self.type == "ivfpq":
            ivf = faiss.SearchParametersIVF(nprobe=int(nprobe or p.nprobe))
            return faiss.IndexRefineSearchParameters(
                k_factor=float(p.k_factor), base_index_params=ivf
            )
        if self.type == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(max(ef_search or p.ef_search, k)))
        return None

    def search(
        self,
        query: torch.Tensor | np.ndarray,
        k: int = 10,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """The ``k`` best entries per query row; ``nprobe`` (ivfpq) and ``ef_search`` (hnsw)
        override the values stored with the index for this search only."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_float32(query, normalise=self.metric == "cosine")
        if q.shape[1] != self.dim:
            raise ValueError(
                f"query features have {q.shape[1]} channels but the index has {self.dim}; use "
                "features from the same model"
            )
        k = min(k, len(self))
        params = self._search_params(k, nprobe, ef_search)
        scores, indices = self.index.search(q, k, params=params)
        found = indices >= 0
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        ids = [[_py(self.ids[j]) if j >= 0 else None for j in row] for row in indices]
        return SearchResult(torch.from_numpy(scores), torch.from_numpy(indices).long(), ids)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``ids.npy`` and ``index.json`` to a folder."""
        faiss = _import_faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        np.save(directory / IDS_FILE, self.ids, allow_pickle=False)
        meta = {
            "format": "sureid-index",
            "version": 1,
            "type": self.type,
            "params": asdict(self.params),
            "dim": self.dim,
            "count": len(self),
            "metric": self.metric,
            "model": self.model,
            "ids": "int64" if self.ids.dtype.kind == "i" else "str",
        }
        (directory / INDEX_META).write_text(json.dumps(meta, indent=1))
        give_umask_permissions(tuple(directory / f for f in (INDEX_FILE, IDS_FILE, INDEX_META)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AnnIndex:
        """Read an index written by :meth:`save` (``sureid index build``)."""
        faiss = _import_faiss()
        directory = Path(directory)
        for name in (INDEX_META, INDEX_FILE, IDS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found: an index is a folder with {INDEX_FILE}, "
                    f"{IDS_FILE} and {INDEX_META} (written by sureid index build)"
                )
        meta = json.loads((directory / INDEX_META).read_text())
        if meta.get("format") != "sureid-index":
            raise SureidError(f"{directory / INDEX_META} is not a SUREID index file")
        index = faiss.read_index(str(directory / INDEX_FILE))
        ids = np.load(directory / IDS_FILE, allow_pickle=False)
        if len(ids) != index.ntotal:
            raise SureidError(
                f"{directory}: {index.ntotal} indexed vectors but {len(ids)} ids; the index "
                "files do not belong together"
            )
        params = IndexParams(**meta["params"])
        return cls(index, ids, meta["type"], params, metric=meta["metric"], model=meta["model"])


def _py(value: Any) -> str | int:
    """A numpy id as a Python int or str."""
    return value.item() if isinstance(value, np.generic) else value
