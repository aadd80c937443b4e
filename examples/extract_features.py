"""Embed a folder of person crops, save it as a searchable gallery, and query it.

    python examples/extract_features.py --model path/to/checkpoint --images crops/ --out gallery/
    python examples/extract_features.py --model path/to/checkpoint --out gallery/ --query person.jpg

The first form extracts L2-normalised embeddings of every image under ``--images`` (folders are
searched recursively, as ``sureid extract`` does; unreadable files are skipped and listed, and a
folder without images is an error) and saves them with their paths as ids; the second loads that
gallery and prints the closest crops to each query image. ``sureid extract`` and
``sureid search`` do the same from the command line.
"""

from __future__ import annotations

import argparse
import sys

from sureid import GalleryIndex, SureidModel, extract_features
from sureid.inference import list_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--out", required=True, help="gallery folder (written or read)")
    parser.add_argument(
        "--images", nargs="+", help="crops to put in the gallery: image files and/or folders"
    )
    parser.add_argument("--query", nargs="*", default=[], help="images (or folders) to search for")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    # Folders -> their image files, before the model loads: a missing path or a folder without
    # images fails here, naming it (an empty gallery is never what was asked for).
    try:
        paths = list_images(args.images) if args.images else []
        query_paths = list_images(args.query) if args.query else []
    except (OSError, ValueError) as err:
        parser.error(str(err))  # one line and exit status 2, as the sureid command does
    model = SureidModel.from_pretrained(args.model)
    if paths:
        result = extract_features(
            model, paths, batch_size=args.batch_size, device=args.device, on_error="skip"
        )
        for skipped in result.skipped:
            print(f"skipped {skipped.source}: {skipped.error}", file=sys.stderr)
        if not len(result.features):
            sys.exit(f"none of the {len(paths)} images could be read; nothing was saved")
        ids = [paths[i] for i in result.indices.tolist()]
        GalleryIndex(result.features, ids=ids, model=args.model, skipped=result.skipped).save(
            args.out
        )
        print(f"{len(ids)} crops -> {args.out} ({result.images_per_second:.1f} images/s)")
    if query_paths:
        gallery = GalleryIndex.load(args.out)
        queries = extract_features(model, query_paths, device=args.device, progress=False)
        hits = gallery.search(queries, k=args.top_k)
        for path, ids, scores in zip(query_paths, hits.ids, hits.scores.tolist()):
            print(path)
            for rank, (gid, score) in enumerate(zip(ids, scores), start=1):
                print(f"  {rank}. {score:.3f}  {gid}")


if __name__ == "__main__":
    main()
