"""Gallery search: nearest neighbours over L2-normalised features, exact or with faiss.

- :class:`GalleryIndex`: the gallery's features and ids. ``search(query, k)`` gives the ``k``
  best entries per query as a :class:`SearchResult`, by exact search: a chunked matrix product
  in torch (``backend="torch"``), or ``faiss.IndexFlatIP`` (``backend="faiss"``, faster on
  large CPU galleries; ``pip install sureid[faiss]``). With ``metric="cosine"`` (the default)
  gallery and queries are L2-normalised, as :func:`~sureid.extract_features` returns them.
- ``save(dir)`` / ``GalleryIndex.load(dir)``: the features as safetensors
  (``gallery.safetensors``) and the ids, metric, the model that made the features and the
  inputs left out of the gallery as JSON (``gallery.json``). The files get the permissions the
  process's umask gives new files (as ``open`` does), not safetensors' owner-only 0600.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_sureid import SureidError
from .inference import SkippedInput, resolve_device
from .permissions import give_umask_permissions

GALLERY_WEIGHTS = "gallery.safetensors"
GALLERY_META = "gallery.json"
_FAISS_HINT = "pip install sureid[faiss]  (or: pip install faiss-cpu)"


@dataclass
class SearchResult:
    """Top-k answers for each query: ``scores`` and ``indices`` [Q, k], ``ids`` Q lists of k.

    Scores are cosine similarities (``metric="cosine"``) or inner products (``"ip"``), highest
    first; ``indices`` are gallery positions, ``ids`` the gallery ids at those positions.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    ids: list[list[Any]]


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"backend='faiss' needs the faiss package: {_FAISS_HINT}") from err
    return faiss


def _as_skipped(item: Any) -> SkippedInput:
    """A :class:`SkippedInput` from one (a dict with index / source / error, or a 3-tuple)."""
    if isinstance(item, SkippedInput):
        return item
    if isinstance(item, dict):
        return SkippedInput(int(item["index"]), str(item["source"]), str(item["error"]))
    index, source, error = item
    return SkippedInput(int(index), str(source), str(error))


def _check_id(value: Any) -> str | int:
    if isinstance(value, bool):
        raise SureidError(f"gallery ids must be strings or integers, got {value!r}")
    if isinstance(value, str | int):
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        return int(value)
    raise SureidError(
        f"gallery ids must be strings or integers (they are saved as JSON), got "
        f"{type(value).__name__} {value!r}"
    )


class GalleryIndex:
    """Nearest-neighbour search over gallery embeddings.

    ``GalleryIndex(features, ids=paths)``; ``add(more, ids=...)``; ``search(query, k)`` ->
    :class:`SearchResult`; ``save(dir)`` / ``GalleryIndex.load(dir)`` (``gallery.safetensors`` +
    ``gallery.json``). ``metric="cosine"`` L2-normalises gallery and queries (the scores are
    cosine similarities), ``"ip"`` uses raw inner products. ``backend="torch"`` is exact search
    by matrix product (chunked over queries); ``backend="faiss"`` uses ``faiss.IndexFlatIP``
    (also exact, faster on large CPU galleries; ``pip install sureid[faiss]``). Ids default to
    the running position (0, 1, ...); they need not be unique (they may be person ids). Ties in
    score come back in the backend's order.

    Two records travel with the gallery (saved and loaded, never used by the search): ``model``,
    the checkpoint (folder or hub id) whose features these are, or None; ``skipped``, the
    inputs left out of it (:class:`~sureid.inference.SkippedInput`: position among the inputs
    of the extraction, source, error), as ``extract_features(..., on_error="skip")`` lists them.
    """

    def __init__(
        self,
        features: torch.Tensor | np.ndarray | None = None,
        ids: Sequence[Any] | None = None,
        *,
        backend: str = "torch",
        metric: str = "cosine",
        dim: int | None = None,
        device: str | torch.device = "cpu",
        model: str | os.PathLike | None = None,
        skipped: Sequence[Any] = (),
    ):
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
        if metric not in ("cosine", "ip"):
            raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")
        self.backend = backend
        self.metric = metric
        self.device = resolve_device(device)
        self.dim = dim
        self.model = None if model is None else str(model)
        self.skipped: list[SkippedInput] = [_as_skipped(item) for item in skipped]
        self.ids: list[Any] = []
        self._features: torch.Tensor | None = None
        self._faiss = None
        if backend == "faiss":
            _import_faiss()
        if features is not None:
            self.add(features, ids)
        elif ids is not None:
            raise ValueError("ids were given without features")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({len(self)} entries, dim={self.dim}, metric={self.metric!r}, "
            f"backend={self.backend!r})"
        )

    def _prepare(self, features, what: str) -> torch.Tensor:
        x = features if isinstance(features, torch.Tensor) else torch.as_tensor(features)
        x = x.detach().float()
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise ValueError(f"{what} must be [N, C] (or [C]), got shape {tuple(x.shape)}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(
                f"{what} have {x.shape[1]} channels but the gallery has {self.dim}; use "
                "features from the same model"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return F.normalize(x, dim=1) if self.metric == "cosine" else x

    def add(self, features: torch.Tensor | np.ndarray, ids: Sequence[Any] | None = None) -> None:
        """Append gallery entries; ``ids`` (one per row) default to their positions."""
        x = self._prepare(features, "gallery features")
        if ids is None:
            new_ids = list(range(len(self.ids), len(self.ids) + len(x)))
        else:
            new_ids = [_check_id(v) for v in ids]
            if len(new_ids) != len(x):
                raise ValueError(f"got {len(new_ids)} ids for {len(x)} feature rows")
        self.dim = x.shape[1]
        if self.backend == "faiss":
            faiss = _import_faiss()
            if self._faiss is None:
                self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32))
        else:
            x = x.to(self.device)
            self._features = x if self._features is None else torch.cat([self._features, x])
        self.ids.extend(new_ids)

    @property
    def features(self) -> torch.Tensor:
        """The stored gallery features [N, C] (normalised when ``metric="cosine"``), on the CPU."""
        if not self.ids:
            return torch.empty(0, self.dim or 0)
        if self.backend == "faiss":
            return torch.from_numpy(self._faiss.reconstruct_n(0, self._faiss.ntotal))
        return self._features.cpu()

    def search(
        self, query: torch.Tensor | np.ndarray, k: int = 10, chunk_size: int = 1024
    ) -> SearchResult:
        """The ``k`` best gallery entries for each query row (k is capped at the gallery size)."""
        if not self.ids:
            raise SureidError("the gallery is empty; add features before searching")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._prepare(query, "query features")
        k = min(k, len(self))
        if self.backend == "faiss":
            scores, indices = self._faiss.search(np.ascontiguousarray(q.cpu().numpy()), k)
            scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
        else:
            parts_s, parts_i = [], []
            for s in range(0, len(q), chunk_size):
                sim = q[s : s + chunk_size].to(self.device) @ self._features.T
                top = sim.topk(k, dim=1)
                parts_s.append(top.values.cpu())
                parts_i.append(top.indices.cpu())
            scores, indices = torch.cat(parts_s), torch.cat(parts_i)
        ids = [[self.ids[j] for j in row] for row in indices.tolist()]
        return SearchResult(scores=scores, indices=indices, ids=ids)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``gallery.safetensors`` (features) and ``gallery.json`` (ids, metric, model,
        skipped inputs) to a folder; both files get the umask's permissions (0644 under 022)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / GALLERY_WEIGHTS
        save_file({"features": self.features.contiguous()}, str(weights))
        meta = {
            "format": "sureid-gallery",
            "version": 1,
            "metric": self.metric,
            "dim": self.dim,
            "size": len(self),
            "model": self.model,
            "skipped": [
                {"index": s.index, "source": s.source, "error": s.error} for s in self.skipped
            ],
            "ids": self.ids,
        }
        with open(directory / GALLERY_META, "w") as f:
            json.dump(meta, f)
        # safetensors writes its file owner-only (0600): give both files what open() gives new
        # files (an older gallery.json keeps its mode when rewritten, so it is set too)
        give_umask_permissions((weights, directory / GALLERY_META))
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        backend: str = "torch",
        device: str | torch.device = "cpu",
    ) -> GalleryIndex:
        """Read a gallery written by :meth:`save` (any backend can load any saved gallery)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, meta_path = directory / GALLERY_WEIGHTS, directory / GALLERY_META
        for path in (weights, meta_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a saved gallery is a folder with {GALLERY_WEIGHTS} and "
                    f"{GALLERY_META} (written by GalleryIndex.save)"
                )
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != "sureid-gallery":
            raise SureidError(f"{meta_path} is not a SUREID gallery file")
        features = load_file(str(weights))["features"]
        if len(features) != len(meta["ids"]):
            raise SureidError(
                f"{directory}: {len(features)} feature rows but {len(meta['ids'])} ids; the "
                "gallery files do not belong together"
            )
        index = cls(
            backend=backend,
            metric=meta["metric"],
            dim=meta.get("dim"),
            device=device,
            model=meta.get("model"),  # galleries saved before these two were recorded: none
            skipped=meta.get("skipped") or (),
        )
        if len(features):
            index.add(features, meta["ids"])
        return index
