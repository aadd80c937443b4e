"""``sureid index build``: an approximate-search index (faiss) over a saved gallery; and the
``--index`` options that ``sureid search`` takes (``add_search_target``, ``open_search_target``)."""

from __future__ import annotations

import argparse


def _cmd_index_build(args: argparse.Namespace) -> int:
    """Index a gallery folder (sureid extract) and save the index to --out."""
    import time

    from ..index import AnnIndex, IndexParams

    params = IndexParams(
        nlist=args.nlist,
        pq_m=args.pq_m,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        seed=args.seed,
    )
    start = time.perf_counter()
    index = AnnIndex.from_gallery(args.gallery, type=args.type, params=params, progress=True)
    out = index.save(args.out)
    print(
        f"indexed {len(index)} vectors (dim {index.dim}, {args.type}) in "
        f"{time.perf_counter() - start:.1f} s; wrote {out}"
    )
    print(f"search it with: sureid search --index {out} --images ...")
    return 0


def add_parsers(sub) -> None:
    """Parser entries of ``index build``."""
    index = sub.add_parser("index", help="approximate-search indexes (faiss) for large galleries")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="index a saved gallery (sureid extract)")
    build.add_argument("--gallery", required=True, help="gallery folder written by sureid extract")
    build.add_argument("--out", required=True, help="folder for index.faiss, ids.npy, index.json")
    build.add_argument(
        "--type",
        default="ivfpq",
        choices=("ivfpq", "hnsw", "flat"),
        help="ivfpq (IVF + 4-bit PQ, SQ8 re-ranking), hnsw (HNSW graph on SQ8) or flat (exact); "
        "docs/inference.md has a table by gallery size and memory",
    )
    build.add_argument("--nlist", type=int, default=None, help="ivfpq lists (default ~4 sqrt(N))")
    build.add_argument("--pq-m", type=int, default=None, help="ivfpq sub-quantisers (dim / 4)")
    build.add_argument("--nprobe", type=int, default=None, help="ivfpq lists searched (default)")
    build.add_argument("--hnsw-m", type=int, default=None, help="hnsw links per node (32)")
    build.add_argument("--ef-search", type=int, default=None, help="hnsw search list (64)")
    build.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    build.set_defaults(func=_cmd_index_build)


def add_search_target(parser) -> None:
    """``sureid search``'s gallery options: --gallery DIR (exact) or --index DIR, and the
    per-search overrides --nprobe / --ef-search."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--gallery", help="gallery folder written by sureid extract")
    target.add_argument("--index", help="index folder written by sureid index build")
    parser.add_argument("--nprobe", type=int, default=None, help="with --index (ivfpq)")
    parser.add_argument("--ef-search", type=int, default=None, help="with --index (hnsw)")


def open_search_target(args: argparse.Namespace):
    """The GalleryIndex of --gallery, or the AnnIndex of --index with the overrides applied."""
    if args.index is None:
        from ..gallery import GalleryIndex

        return GalleryIndex.load(args.gallery)
    from ..index import AnnIndex

    index = AnnIndex.load(args.index)
    if args.nprobe is not None:
        index.params.nprobe = args.nprobe
    if args.ef_search is not None:
        index.params.ef_search = args.ef_search
    return index
