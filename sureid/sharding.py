"""Extraction across processes: each process embeds its share of the inputs into a shard file,
and the main process merges the shards into one gallery, in input order.

The split is accelerate's (``PartialState.split_between_processes`` over the input positions:
process ``r`` of ``n`` gets one contiguous range). A process writes its shard to
``OUT/shards/shard-{r:05d}-of-{n:05d}.safetensors`` (its features and their input positions)
and ``.json`` beside it (the ids of every input of its range, the range, the model, the inputs
left out), each written to a temporary file then renamed, the JSON last: a shard whose JSON
exists is finished. A run stopped halfway and started again reuses the finished shards after
checking that they cover the same inputs with the same model; any other shard is an error that
names the folder, never silently reused. The merge (:func:`merge_shards`) gives what one
process would have: features, ids and skipped inputs in input order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configuration_sureid import SureidError
from .inference import SkippedInput
from .paths import replace_atomically

SHARDS_DIR = "shards"
SHARD_FORMAT = "sureid-gallery-shard"
_SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.(json|safetensors)$")


@dataclass
class GalleryPart:
    """Embeddings of a range of the inputs: ``features[r]`` is input ``indices[r]`` (its
    position among *all* inputs), with id ``ids[r]``; ``skipped``: the inputs left out."""

    features: torch.Tensor
    indices: torch.Tensor
    ids: list[Any]
    skipped: list[SkippedInput] = field(default_factory=list)
    num_inputs: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.features) / self.seconds if self.seconds > 0 else float("nan")


def extract_part(model, inputs, ids: Sequence[Any], start: int = 0, **kwargs) -> GalleryPart:
    """``extract_features(model, inputs, **kwargs)`` as a :class:`GalleryPart`: the kept rows'
    ids, and skipped positions shifted by ``start`` (where ``inputs`` begin among all inputs)."""
    from .inference import extract_features  # looked up at each call (tests spy on it)

    result = extract_features(model, inputs, return_kept=True, **kwargs)
    skipped = [SkippedInput(s.index + start, s.source, s.error) for s in result.skipped]
    kept = [ids[i] for i in result.indices.tolist()]
    indices = result.indices + start
    return GalleryPart(result.features, indices, kept, skipped, result.num_inputs, result.seconds)


def process_range(state, num_inputs: int) -> range:
    """The input positions this process embeds: accelerate's split of ``range(num_inputs)``
    (contiguous; the first processes get one more when it does not divide evenly)."""
    with state.split_between_processes(torch.arange(num_inputs)) as mine:
        if len(mine):
            return range(int(mine[0]), int(mine[-1]) + 1)
    return range(num_inputs, num_inputs)  # more processes than inputs: the last get none


def take(inputs, span: range):
    """The inputs at the positions ``span``: a ``datasets.Dataset`` by index, else a slice."""
    if hasattr(inputs, "select") and hasattr(inputs, "column_names"):
        return inputs.select(span)
    return inputs[span.start : span.stop]


def shard_paths(folder: str | os.PathLike, rank: int, world: int) -> tuple[Path, Path]:
    """(features file, JSON file) of shard ``rank`` of ``world`` in ``folder``."""
    stem = Path(folder) / f"shard-{rank:05d}-of-{world:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _fix(folder: Path) -> str:
    return (
        f"remove the folder (rm -r {folder}) to extract afresh, or run again with the inputs, "
        "--model and number of processes of the stopped run"
    )


def check_no_other_split(folder: str | os.PathLike, world: int) -> None:
    """Raise if ``folder`` holds shards of a split into another number of processes."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = _SHARD_NAME.match(path.name)
        if match and int(match.group(2)) != world:
            raise SureidError(
                f"{folder} holds shards of a run split into {int(match.group(2))} processes "
                f"({path.name}), this run has {world}: they are not reused; {_fix(folder)}"
            )


def write_shard(folder, rank: int, world: int, span: range, span_ids, part, model) -> None:
    """Save one process's :class:`GalleryPart` (its inputs: ``span``, with ids ``span_ids``)."""
    from safetensors.torch import save_file

    weights, meta_path = shard_paths(folder, rank, world)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": part.features.contiguous(), "indices": part.indices.contiguous()}
    replace_atomically(weights, lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "format": SHARD_FORMAT,
        "version": 1,
        "shard": rank,
        "num_shards": world,
        "start": span.start,
        "stop": span.stop,
        "model": model,
        "inputs": list(span_ids),
        "skipped": [{"index": s.index, "source": s.source, "error": s.error} for s in part.skipped],
    }

    def dump(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f)

    replace_atomically(meta_path, dump)


def _mismatch(path: Path, why: str) -> SureidError:
    folder = path.parent
    return SureidError(
        f"{path} does not match this run ({why}): a shard of other inputs or another model is "
        f"not reused; {_fix(folder)}"
    )


def _read_meta(meta_path: Path, rank: int, world: int) -> dict:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise _mismatch(meta_path, f"unreadable: {err}") from err
    if meta.get("format") != SHARD_FORMAT or (meta.get("shard"), meta.get("num_shards")) != (
        rank,
        world,
    ):
        raise _mismatch(meta_path, f"not shard {rank} of {world}")
    return meta


def load_shard(folder, rank: int, world: int, ids: Sequence[Any], model, span=None):
    """Shard ``rank`` of ``world`` as a :class:`GalleryPart` (None if it is not finished),
    checked against this run: the same range (``span``, when given), the same ids of its inputs
    (``ids``: those of *all* inputs), the same model, and features that account for each input
    of its range once. Any difference raises a :class:`SureidError` naming the shard."""
    from safetensors.torch import load_file

    weights, meta_path = shard_paths(folder, rank, world)
    if not meta_path.is_file():
        return None
    meta = _read_meta(meta_path, rank, world)
    start, stop = meta["start"], meta["stop"]
    if span is not None and (start, stop) != (span.start, span.stop):
        raise _mismatch(meta_path, f"inputs {start}..{stop}, this run's are {span.start}..")
    if stop > len(ids) or meta["inputs"] != list(ids[start:stop]):
        raise _mismatch(meta_path, f"its {stop - start} inputs are not this run's {start}..{stop}")
    if meta["model"] != model:
        raise _mismatch(meta_path, f"extracted with {meta['model']}, this run uses {model}")
    if not weights.is_file():
        raise _mismatch(meta_path, f"its features file {weights.name} is missing")
    tensors = load_file(str(weights))
    features, indices = tensors["features"], tensors["indices"]
    skipped = [SkippedInput(int(s["index"]), s["source"], s["error"]) for s in meta["skipped"]]
    covered = sorted(indices.tolist() + [s.index for s in skipped])
    if len(features) != len(indices) or covered != list(range(start, stop)):
        raise _mismatch(meta_path, "its features do not account for each of its inputs once")
    kept = [ids[i] for i in indices.tolist()]
    return GalleryPart(features, indices, kept, skipped, stop - start)


def merge_shards(folder, world: int, ids: Sequence[Any], model) -> GalleryPart:
    """The ``world`` finished shards in ``folder`` as one :class:`GalleryPart`, in input order;
    they must cover all inputs (``ids``) in turn."""
    parts, stop = [], 0
    for rank in range(world):
        part = load_shard(folder, rank, world, ids, model)
        path = shard_paths(folder, rank, world)[1]
        if part is None:
            raise SureidError(f"{path} is missing: process {rank} did not finish its shard")
        first = min(part.indices.tolist() + [s.index for s in part.skipped], default=stop)
        if first != stop:
            raise _mismatch(path, f"it starts at input {first}, the shard before ends at {stop}")
        stop += part.num_inputs
        parts.append(part)
    if stop != len(ids):
        raise SureidError(f"{folder}: the shards cover {stop} inputs, this run has {len(ids)}")
    return GalleryPart(
        features=torch.cat([p.features for p in parts]),
        indices=torch.cat([p.indices for p in parts]),
        ids=[i for p in parts for i in p.ids],
        skipped=[s for p in parts for s in p.skipped],
        num_inputs=stop,
    )


def run_shard(folder, rank: int, world: int, span: range, inputs, ids, model, extract) -> bool:
    """Embed this process's inputs (``span`` of ``inputs``) and write its shard, unless a
    finished shard of the same inputs and model is there: then return True (reused).
    ``extract(inputs, ids, start)`` -> :class:`GalleryPart`, e.g. :func:`extract_part` bound
    to a model and options."""
    check_no_other_split(folder, world)
    if load_shard(folder, rank, world, ids, model, span) is not None:
        return True
    span_ids = list(ids[span.start : span.stop])
    part = extract(take(inputs, span), span_ids, span.start)
    write_shard(folder, rank, world, span, span_ids, part, model)
    return False


def extract_across_processes(state, folder, inputs, ids, model, extract) -> GalleryPart | None:
    """Each process of ``state`` (an ``accelerate.PartialState``) runs :func:`run_shard` on its
    share; after ``wait_for_everyone`` the main process returns the merged shards (the other
    processes None). Shards already finished are reused (a note on stderr says so)."""
    import sys

    rank, world = state.process_index, state.num_processes
    span = process_range(state, len(ids))
    if run_shard(folder, rank, world, span, inputs, ids, model, extract):
        print(f"shard {rank} of {world}: finished in an earlier run, reused", file=sys.stderr)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return merge_shards(folder, world, ids, model)
