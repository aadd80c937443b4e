"""Embed a folder of person crops, save it as a searchable gallery, and query it.

    python examples/extract_features.py --model path/to/checkpoint --images crops/ --out gallery/
    python examples/extract_features.py --model path/to/checkpoint --out gallery/ --query person.jpg

The first form extracts L2-normalised embeddings of every image under ``--images`` (unreadable
files are skipped and listed) and saves them with their paths as ids; the second loads that
gallery and prints the closest crops to each query image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sureid import GalleryIndex, SureidModel, extract_features

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--out", required=True, help="gallery folder (written or read)")
    parser.add_argument("--images", help="folder of crops to add to the gallery")
    parser.add_argument("--query", nargs="*", default=[], help="images to search for")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    model = SureidModel.from_pretrained(args.model)
    if args.images:
        paths = sorted(
            p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        result = extract_features(
            model, paths, batch_size=args.batch_size, device=args.device, on_error="skip"
        )
        ids = [str(paths[i]) for i in result.indices.tolist()]
        GalleryIndex(result.features, ids=ids).save(args.out)
        print(f"{len(ids)} crops -> {args.out} ({result.images_per_second:.1f} images/s)")
        for skipped in result.skipped:
            print(f"skipped {skipped.source}: {skipped.error}")
    if args.query:
        gallery = GalleryIndex.load(args.out)
        queries = extract_features(model, args.query, device=args.device, progress=False)
        hits = gallery.search(queries, k=args.top_k)
        for path, ids, scores in zip(args.query, hits.ids, hits.scores.tolist()):
            print(path)
            for rank, (gid, score) in enumerate(zip(ids, scores), start=1):
                print(f"  {rank}. {score:.3f}  {gid}")


if __name__ == "__main__":
    main()
