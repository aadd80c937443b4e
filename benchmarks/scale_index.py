"""Print the gallery-index scale table quoted in docs/benchmarks.md (sureid.index.AnnIndex).

    python benchmarks/scale_index.py --size 100000
    python benchmarks/scale_index.py --size 1000000 --nprobe 32 64 128 --ef-search 32 64 128

The gallery is drawn to look like re-ID features, not uniform noise: ``size / views``
identities, each a unit-norm centre (anisotropic: channel i scaled by 1/sqrt(i+1), as learnt
features are) with ``views`` views = centre + per-view noise, L2-normalised (same-identity
views have cosine about 1/(1+noise^2)). The queries are other views of gallery identities.
For each index type (flat, ivfpq, hnsw) it measures the build time, the index size (bytes of
the saved faiss file) and the process RSS growth while building, the latency of one query
(1 thread, p50/p95) and of batches of 1,000 (all threads), and recall@1 / recall@10 against
exact search (the share of exact top-1 found at rank 1; of the exact top-10 found in the
top-10). Extra ``--nprobe`` / ``--ef-search`` values add search-only rows (same build).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def make_data(size, dim, views, noise, queries, seed, chunk=100_000):
    """Gallery [size, dim] float32 (made in chunks) and queries of gallery identities."""
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    n_ids = max(1, size // views)
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery = np.empty((size, dim), dtype=np.float32)
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        rows = np.arange(start, stop) % n_ids
        gallery[start:stop] = _views(centres[rows], scale, noise, rng)
    qids = rng.choice(n_ids, size=queries, replace=queries > n_ids)
    return gallery, _views(centres[qids], scale, noise, rng)


def _views(centres, scale, noise, rng):
    """Views of these identity centres: centre + noise (same spectrum), L2-normalised."""
    g = rng.standard_normal(centres.shape, dtype=np.float32) * scale
    g *= noise / np.linalg.norm(g, axis=1, keepdims=True)
    v = centres + g
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _latency_single(index, queries, n, **search):
    import faiss

    faiss.omp_set_num_threads(1)
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        index.search(q[None], k=10, **search)
        times.append(time.perf_counter() - t)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return np.percentile(times, 50) * 1e3, np.percentile(times, 95) * 1e3


def _latency_batch(index, queries, rounds=3, **search):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        hits = index.search(queries, k=10, **search)
        times.append(time.perf_counter() - t)
    return np.median(times) * 1e3, hits.indices.numpy()


def _recalls(found, exact):
    r1 = float(np.mean(found[:, 0] == exact[:, 0]))
    r10 = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))
    return r1, r10


def _index_bytes(index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        return (Path(tmp) / "index.faiss").stat().st_size


def _build(kind, gallery, args):
    from sureid.index import AnnIndex, IndexParams

    params = IndexParams(nlist=args.nlist, pq_m=args.pq_m, hnsw_m=args.hnsw_m)
    rss = _rss()
    t = time.perf_counter()
    index = AnnIndex.build(gallery, type=kind, params=params, metric="ip")
    return index, time.perf_counter() - t, _rss() - rss


def _rows(kind, index, queries, exact, args):
    """One row per search setting of this index (its default first, then the extra ones)."""
    settings = [{}]
    if kind == "ivfpq":
        settings += [{"nprobe": v} for v in args.nprobe if v != index.params.nprobe]
    if kind == "hnsw":
        settings += [{"ef_search": v} for v in args.ef_search if v != index.params.ef_search]
    n_single = args.single if kind != "flat" else min(args.single, 100)
    for search in settings:
        p50, p95 = _latency_single(index, queries, n_single, **search)
        batch_ms, found = _latency_batch(index, queries, **search)
        yield search, p50, p95, batch_ms, _recalls(found, exact)


def _setting(kind, index, search):
    p = index.params
    if kind == "ivfpq":
        nprobe = search.get("nprobe", p.nprobe)
        return f"nlist={p.nlist}, PQ{p.pq_m}, nprobe={nprobe}, k_factor={p.k_factor}"
    if kind == "hnsw":
        return f"M={p.hnsw_m}, efC={p.ef_construction}, efSearch={search.get('ef_search', p.ef_search)}"
    return "exact"


def run(args) -> int:
    import faiss

    from sureid.index import AnnIndex

    t = time.perf_counter()
    gallery, queries = make_data(
        args.size, args.dim, args.views, args.noise, args.queries, args.seed
    )
    print(f"data: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    exact = AnnIndex.build(gallery, type="flat", metric="ip").search(queries, k=10)
    exact = exact.indices.numpy()
    print(_header(args, faiss))
    for kind in args.types:
        index, build_s, rss = _build(kind, gallery, args)
        size = _index_bytes(index)
        for search, p50, p95, batch_ms, (r1, r10) in _rows(kind, index, queries, exact, args):
            print(
                f"| {kind} | {_setting(kind, index, search)} | {build_s:.1f} | "
                f"{size / 2**20:.0f} ({size / args.size:.0f} B/vec) | {rss / 2**20:.0f} | "
                f"{p50:.2f} / {p95:.2f} | {batch_ms:.0f} | {r1:.3f} | {r10:.3f} |",
                flush=True,
            )
        del index
    return 0


def _header(args, faiss) -> str:
    command = "python benchmarks/scale_index.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return (
        f"`{command}`; {machine}, faiss {faiss.__version__}; gallery {args.size:,} x {args.dim} "
        f"({args.size // args.views:,} identities x {args.views} views, noise {args.noise}), "
        f"{args.queries:,} queries\n\n"
        "| type | setting | build s | index MiB | RSS growth MiB | 1 query p50 / p95 ms "
        "(1 thread) | 1,000 queries ms | recall@1 | recall@10 |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="gallery vectors")
    parser.add_argument("--dim", type=int, default=384, help="feature width (the student's)")
    parser.add_argument("--views", type=int, default=10, help="views per identity")
    parser.add_argument("--noise", type=float, default=0.6, help="per-view noise norm")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=1000, help="queries timed one by one")
    parser.add_argument("--types", nargs="+", default=["flat", "ivfpq", "hnsw"])
    parser.add_argument("--nlist", type=int, default=None, help="default: about 4 sqrt(N)")
    parser.add_argument("--pq-m", type=int, default=None, help="default: dim / 8")
    parser.add_argument("--hnsw-m", type=int, default=None, help="default: 32")
    parser.add_argument("--nprobe", type=int, nargs="*", default=[], help="extra ivfpq rows")
    parser.add_argument("--ef-search", type=int, nargs="*", default=[], help="extra hnsw rows")
    parser.add_argument("--seed", type=int, default=0)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
