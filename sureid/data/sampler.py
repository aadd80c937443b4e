"""Identity (P x K) sampler: every batch holds P identities with K images each.

Batch-hard triplet loss needs positives and negatives inside a batch, hence P x K batches
(default 16 x 4 = 64, the paper's setup). The sampler is deterministic under ``seed`` and
``set_epoch``, has an exact length, and under DDP gives every process different identities
in the same step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _labels_of(labels) -> np.ndarray:
    """Person ids as an int array; a ``datasets.Dataset`` is read from its ``pid`` column."""
    if hasattr(labels, "column_names") and hasattr(labels, "data"):  # datasets.Dataset
        if "pid" not in labels.column_names:
            raise ValueError(
                f"the data set has no 'pid' column (columns: {labels.column_names}); "
                "pass the person ids explicitly."
            )
        # via the formatter, not .data: honours select()/shuffle() index mappings
        return np.asarray(labels.with_format("numpy", columns=["pid"])["pid"], dtype=np.int64)
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy().astype(np.int64)
    return np.asarray(list(labels), dtype=np.int64)


class IdentitySampler(Sampler[int]):
    """Yield dataset indices in batches of ``num_identities`` x ``num_instances``.

    Per epoch every identity's images are shuffled and cut into chunks of K (an identity with
    fewer than K images gets one chunk drawn with replacement); each step draws
    ``num_replicas * num_identities`` *distinct* identities, weighted by their chunks left (so
    large identities are spread over the epoch, not dropped at its end); replica ``r`` takes
    the ``r``-th group of P. The step count is ``total_chunks // (num_replicas * P)``, so
    ``len()`` is exact and the same on every replica.

    ``shard=True`` (plain DDP, a ``DataLoader`` per process): this replica's indices only.
    ``shard=False`` (``accelerate.prepare`` / ``transformers.Trainer``, which split batches
    across processes themselves): the whole step sequence, replica 0's batch first, so that
    accelerate's round-robin split hands each process a disjoint set of identities.
    Use a ``DataLoader`` with ``batch_size = num_identities * num_instances``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_identities: int = 16,
        num_instances: int = 4,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shard: bool = True,
    ) -> None:
        if num_identities < 1 or num_instances < 1:
            raise ValueError(
                f"num_identities and num_instances must be >= 1, got {num_identities} and "
                f"{num_instances}."
            )
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, num_replicas={num_replicas}).")
        self.labels = _labels_of(labels)
        if self.labels.ndim != 1 or len(self.labels) == 0:
            raise ValueError("the sampler needs a non-empty 1-D sequence of person ids.")
        self.num_identities = int(num_identities)
        self.num_instances = int(num_instances)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shard = bool(shard)
        self.epoch = 0

        self.pids = np.unique(self.labels)
        self.index_of = {int(p): np.flatnonzero(self.labels == p) for p in self.pids}
        per_step = self.num_replicas * self.num_identities
        if len(self.pids) < per_step:
            raise ValueError(
                f"the data set has {len(self.pids)} identities, fewer than num_identities="
                f"{self.num_identities} x num_replicas={self.num_replicas} = {per_step} needed "
                "for one step of distinct identities; lower num_identities."
            )
        total_chunks = sum(max(1, len(ix) // self.num_instances) for ix in self.index_of.values())
        self.num_steps = total_chunks // per_step
        if self.num_steps == 0:  # cannot happen (each pid has >= 1 chunk), kept as a guard
            raise ValueError("the data set is too small for a single P x K batch.")

    @property
    def batch_size(self) -> int:
        """Indices per batch on one replica (P x K): the DataLoader's ``batch_size``."""
        return self.num_identities * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch`` so that every epoch (and every replica) draws the same way."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        replicas = 1 if self.shard else self.num_replicas
        return self.num_steps * replicas * self.batch_size

    def _chunks(self, rng: np.random.Generator, pid: int) -> list[np.ndarray]:
        ix = self.index_of[pid]
        k = self.num_instances
        if len(ix) < k:
            return [rng.choice(ix, size=k, replace=True)]
        ix = rng.permutation(ix)
        return [ix[i * k : (i + 1) * k] for i in range(len(ix) // k)]

    def steps(self) -> list[list[np.ndarray]]:
        """All steps of this epoch: per step, ``num_replicas`` batches of P x K indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        remaining = {int(p): self._chunks(rng, int(p)) for p in self.pids}
        all_pids = np.array(sorted(remaining))
        per_step = self.num_replicas * self.num_identities
        out = []
        for _ in range(self.num_steps):
            avail = np.array([p for p in all_pids if remaining[p]])
            if len(avail) >= per_step:  # weighted by chunks left: like drawing from all chunks
                weights = np.array([len(remaining[p]) for p in avail], dtype=np.float64)
                keys = np.log(rng.random(len(avail))) / weights
                chosen = rng.permutation(avail[np.argsort(-keys)[:per_step]])
            else:  # top up with identities whose chunks ran out: fresh random chunks
                rest = np.setdiff1d(all_pids, avail)
                extra = rng.choice(rest, size=per_step - len(avail), replace=False)
                chosen = rng.permutation(np.concatenate([avail, extra]))
            batch = []
            for p in chosen:
                p = int(p)
                batch.append(remaining[p].pop() if remaining[p] else self._chunks(rng, p)[0])
            flat = np.concatenate(batch)
            n = self.batch_size
            out.append([flat[r * n : (r + 1) * n] for r in range(self.num_replicas)])
        return out

    def __iter__(self) -> Iterator[int]:
        for step in self.steps():
            batches = [step[self.rank]] if self.shard else step
            for batch in batches:
                yield from (int(i) for i in batch)
