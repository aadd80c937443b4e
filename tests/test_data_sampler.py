"""The P x K identity sampler: composition, exact length, determinism, DDP disjointness."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils.data import BatchSampler, DataLoader

from sureid.data import IdentitySampler


def labels_fixture(num_ids: int = 20, seed: int = 0) -> list[int]:
    """Uneven identities: 1..12 images each (some below K), shuffled order, sparse pid values."""
    rng = np.random.default_rng(seed)
    labels = []
    for pid in range(num_ids):
        labels += [pid * 3 + 100] * int(rng.integers(1, 13))
    return list(rng.permutation(labels))


def batches(sampler: IdentitySampler) -> list[list[int]]:
    idx = list(sampler)
    n = sampler.batch_size
    assert len(idx) % n == 0
    return [idx[i : i + n] for i in range(0, len(idx), n)]


@pytest.mark.parametrize("p,k", [(4, 4), (5, 2), (3, 6)])
def test_every_batch_is_p_identities_times_k(p: int, k: int) -> None:
    labels = labels_fixture()
    sampler = IdentitySampler(labels, num_identities=p, num_instances=k, seed=1)
    out = batches(sampler)
    assert len(out) > 0
    for batch in out:
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == p
        assert set(counts.values()) == {k}


def test_len_is_exact_and_defaults_are_16_by_4() -> None:
    labels = labels_fixture(num_ids=40)
    sampler = IdentitySampler(labels)
    assert sampler.batch_size == 64
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert len(list(sampler)) == len(sampler)
    chunks = sum(max(1, c // 4) for c in Counter(labels).values())
    assert len(sampler) == (chunks // 16) * 64


def test_identity_with_fewer_than_k_images_is_sampled_with_replacement() -> None:
    labels = [0] + [1] * 4 + [2] * 4 + [3] * 4
    sampler = IdentitySampler(labels, num_identities=4, num_instances=4, seed=0)
    (batch,) = batches(sampler)
    assert [i for i in batch if labels[i] == 0] == [0, 0, 0, 0]


def test_deterministic_under_seed_and_epoch() -> None:
    labels = labels_fixture()
    a = IdentitySampler(labels, num_identities=4, num_instances=4, seed=3)
    b = IdentitySampler(labels, num_identities=4, num_instances=4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    c = IdentitySampler(labels, num_identities=4, num_instances=4, seed=4)
    assert list(c) != first


def test_an_epoch_uses_most_images_once() -> None:
    labels = [pid for pid in range(32) for _ in range(8)]
    sampler = IdentitySampler(labels, num_identities=8, num_instances=4, seed=0)
    idx = list(sampler)
    assert len(idx) == len(labels)  # 64 chunks of 4 -> 8 steps of 8 x 4
    for epoch in range(4):  # chunks are drawn weighted by what is left: (almost) all get used
        sampler.set_epoch(epoch)
        assert len(set(sampler)) >= 0.95 * len(labels)


def test_ddp_ranks_draw_disjoint_identities_per_step() -> None:
    labels = labels_fixture(num_ids=30)
    r0 = IdentitySampler(labels, num_identities=4, num_instances=2, seed=5, num_replicas=2, rank=0)
    r1 = IdentitySampler(labels, num_identities=4, num_instances=2, seed=5, num_replicas=2, rank=1)
    assert len(r0) == len(r1) > 0
    b0, b1 = batches(r0), batches(r1)
    assert len(b0) == len(b1)
    for x, y in zip(b0, b1, strict=True):
        assert {labels[i] for i in x}.isdisjoint({labels[i] for i in y})
        assert len({labels[i] for i in x}) == 4


def test_shard_false_feeds_accelerate_round_robin() -> None:
    """accelerate.prepare splits batches across processes; each still gets its own identities."""
    from accelerate.data_loader import BatchSamplerShard

    labels = labels_fixture(num_ids=30)
    per_process = []
    for rank in range(2):
        sampler = IdentitySampler(
            labels, num_identities=4, num_instances=2, seed=5, num_replicas=2, shard=False
        )
        global_batches = BatchSampler(sampler, batch_size=sampler.batch_size, drop_last=True)
        per_process.append(list(BatchSamplerShard(global_batches, 2, rank)))
        own = IdentitySampler(
            labels, num_identities=4, num_instances=2, seed=5, num_replicas=2, rank=rank
        )
        assert per_process[-1] == batches(own)  # same as the self-sharded sampler
    for x, y in zip(*per_process, strict=True):
        assert {labels[i] for i in x}.isdisjoint({labels[i] for i in y})


def test_too_few_identities_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="3 identities.*num_identities=4"):
        IdentitySampler([0, 1, 2] * 4, num_identities=4, num_instances=2)
    with pytest.raises(ValueError, match="rank 2"):
        IdentitySampler([0, 1, 2] * 4, num_identities=1, num_replicas=2, rank=2)


def test_reads_pids_from_a_dataset_and_drives_a_dataloader() -> None:
    labels = [p for p in range(6) for _ in range(3)]
    ds = Dataset.from_dict({"pid": labels, "x": list(range(len(labels)))})
    sampler = IdentitySampler(ds, num_identities=3, num_instances=2, seed=0)
    loader = DataLoader(ds.with_format("torch"), batch_size=sampler.batch_size, sampler=sampler)
    got = list(loader)
    assert len(got) == len(sampler) // sampler.batch_size
    for batch in got:
        assert isinstance(batch["pid"], torch.Tensor)
        assert sorted(Counter(batch["pid"].tolist()).values()) == [2, 2, 2]


def test_reads_pids_through_select_and_shuffle_mappings() -> None:
    labels = [p for p in range(8) for _ in range(4)]
    ds = Dataset.from_dict({"pid": labels}).shuffle(seed=0).select(range(0, 32, 2))
    sampler = IdentitySampler(ds, num_identities=2, num_instances=2, seed=0)
    assert sampler.labels.tolist() == ds["pid"][:]
