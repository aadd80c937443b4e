"""`sureid extract` across processes (issue 25, item 1): each process writes a shard, the main
process merges them into the gallery one process would save; a stopped run restarts from its
finished shards, and a shard of other inputs or another model is an error, never reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sureid.cli import main
from sureid.configuration_sureid import SureidError
from sureid.gallery import GalleryIndex
from sureid.inference import SkippedInput
from sureid.sharding import (
    GalleryPart,
    check_no_other_split,
    extract_part,
    load_shard,
    merge_shards,
    run_shard,
    shard_paths,
    take,
    write_shard,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Seven crops and, at position 4, a corrupt jpg (for --skip-errors)."""
    root = tmp_path_factory.mktemp("crops")
    paths = []
    for i in range(7):
        path = root / f"p{i}.png"
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths.insert(4, str(broken))
    return paths


def _part(ids: list[str], start: int, stop: int, skip: tuple[int, ...] = ()) -> GalleryPart:
    """A made-up part of inputs start..stop (features: the position in every column)."""
    kept = [i for i in range(start, stop) if i not in skip]
    features = torch.tensor(kept, dtype=torch.float32)[:, None].repeat(1, 4)
    skipped = [SkippedInput(i, ids[i], "corrupt") for i in skip]
    return GalleryPart(features, torch.tensor(kept), [ids[i] for i in kept], skipped, stop - start)


# --------------------------------------------------------------------------------------------
# Fast: the shard files, the merge, the restart checks
# --------------------------------------------------------------------------------------------


def test_merge_gives_input_order_ids_and_skipped(tmp_path):
    ids = [f"img{i}.png" for i in range(7)]
    write_shard(tmp_path, 1, 2, range(4, 7), ids[4:], _part(ids, 4, 7, skip=(5,)), "m")
    write_shard(tmp_path, 0, 2, range(0, 4), ids[:4], _part(ids, 0, 4, skip=(1,)), "m")
    merged = merge_shards(tmp_path, 2, ids, "m")
    assert merged.ids == [ids[i] for i in (0, 2, 3, 4, 6)]
    assert merged.features[:, 0].tolist() == [0, 2, 3, 4, 6]
    assert [(s.index, s.source) for s in merged.skipped] == [(1, ids[1]), (5, ids[5])]
    assert merged.num_inputs == 7
    assert not list(tmp_path.glob(".*tmp*"))  # written through temporary files, renamed


def test_a_finished_shard_is_reused_and_an_unfinished_one_redone(tmp_path):
    ids = [f"img{i}.png" for i in range(5)]
    calls = []

    def extract(inputs, span_ids, start):
        calls.append((list(inputs), start))
        return _part(ids, start, start + len(inputs))

    assert not run_shard(tmp_path, 0, 2, range(0, 3), ids, ids, "m", extract)
    assert run_shard(tmp_path, 0, 2, range(0, 3), ids, ids, "m", extract)  # reused
    assert calls == [(ids[:3], 0)]
    weights, meta = shard_paths(tmp_path, 1, 2)
    weights.write_bytes(b"half written")  # stopped before its JSON: not finished, redone
    assert not run_shard(tmp_path, 1, 2, range(3, 5), ids, ids, "m", extract)
    assert calls[-1] == (ids[3:], 3)
    assert merge_shards(tmp_path, 2, ids, "m").ids == ids


@pytest.mark.parametrize(
    "change, words",
    [
        ("inputs", "inputs are not this run's"),
        ("model", "extracted with m"),
        ("count", "account for each of its inputs once"),
        ("range", "inputs 0..3"),
    ],
)
def test_a_shard_of_other_inputs_or_model_is_an_error_naming_the_folder(tmp_path, change, words):
    ids = [f"img{i}.png" for i in range(5)]
    write_shard(tmp_path, 0, 2, range(0, 3), ids[:3], _part(ids, 0, 3), "m")
    model, span = "m", range(0, 3)
    if change == "inputs":
        ids = ["other.png", *ids[1:]]
    elif change == "model":
        model = "another"
    elif change == "count":
        meta = shard_paths(tmp_path, 0, 2)[1]
        record = json.loads(meta.read_text())
        record["skipped"] = [{"index": 2, "source": ids[2], "error": "x"}]
        meta.write_text(json.dumps(record))
    else:
        span = range(0, 2)
    with pytest.raises(SureidError) as err:
        load_shard(tmp_path, 0, 2, ids, model, span)
    assert words in str(err.value)
    assert f"rm -r {tmp_path}" in str(err.value)


def test_shards_of_another_number_of_processes_are_refused(tmp_path):
    ids = [f"img{i}.png" for i in range(5)]
    write_shard(tmp_path, 0, 3, range(0, 2), ids[:2], _part(ids, 0, 2), "m")
    check_no_other_split(tmp_path, 3)
    with pytest.raises(SureidError, match="split into 3 processes"):
        check_no_other_split(tmp_path, 2)
    with pytest.raises(SureidError, match="is missing"):
        merge_shards(tmp_path, 3, ids, "m")


def test_take_splits_a_dataset_by_index_and_a_list_by_slice():
    import datasets

    data = datasets.Dataset.from_dict({"path": [f"p{i}" for i in range(6)]})
    assert take(data, range(2, 5))["path"] == ["p2", "p3", "p4"]
    assert take(list("abcdef"), range(4, 6)) == ["e", "f"]


def test_extract_part_shifts_skipped_positions(model_dir, images):
    part = extract_part(model_dir, images[3:6], images[3:6], 3, on_error="skip", progress=False)
    assert [s.index for s in part.skipped] == [4]
    assert part.ids == [images[3], images[5]] and part.indices.tolist() == [3, 5]


def test_single_process_extract_still_writes_just_the_gallery(model_dir, images, tmp_path):
    out = tmp_path / "gallery"
    args = ["extract", "--model", str(model_dir), "--images", *images, "--out", str(out)]
    assert main([*args, "--skip-errors"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gallery.json", "gallery.safetensors"]
    gallery = GalleryIndex.load(out)
    assert gallery.ids == images[:4] + images[5:]
    assert [s.index for s in gallery.skipped] == [4]


# --------------------------------------------------------------------------------------------
# Slow: two processes under accelerate launch
# --------------------------------------------------------------------------------------------


def _launch(model_dir: Path, images: list[str], out: Path, processes: int = 2):
    """`accelerate launch` of `sureid extract` on the CPU, flags only (no config, no prompt).
    `--cpu` would run one process (accelerate runs several CPU processes only under mpirun),
    so: --multi_gpu, and extract asks accelerate for the CPU when there is no GPU."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_CONFIG_FILE": str(out.parent / "no-accelerate-config.yaml"),
        "PYTHONPATH": str(ROOT),
    }
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"),
        *("-m", "sureid.cli", "extract", "--model", str(model_dir), "--images", *images),
        *("--out", str(out), "--skip-errors", "--device", "cpu", "--batch-size", "2"),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _assert_same_gallery(out: Path, reference: Path) -> None:
    merged, single = GalleryIndex.load(out), GalleryIndex.load(reference)
    assert merged.ids == single.ids and merged.model == single.model
    assert [vars(s) for s in merged.skipped] == [vars(s) for s in single.skipped]
    assert (merged.features - single.features).abs().max() < 1e-6
    assert not (out / "shards").exists()  # removed after the merge


@pytest.fixture(scope="module")
def single(model_dir, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "gallery"
    args = ["extract", "--model", str(model_dir), "--images", *images, "--out", str(out)]
    assert main([*args, "--skip-errors", "--device", "cpu", "--batch-size", "2"]) == 0
    return out


@pytest.mark.slow
def test_two_processes_give_the_single_process_gallery(model_dir, images, single, tmp_path):
    done = _launch(model_dir, images, tmp_path / "gallery")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved 7 embeddings" in done.stdout
    _assert_same_gallery(tmp_path / "gallery", single)


@pytest.mark.slow
def test_a_restarted_run_reuses_the_finished_shard(model_dir, images, single, tmp_path):
    """Stopped after process 0 wrote its shard: the run again skips it, same gallery."""
    out = tmp_path / "gallery"
    model = str(model_dir.resolve())

    def extract(inputs, ids, start):
        return extract_part(model, inputs, ids, start, on_error="skip", progress=False)

    assert not run_shard(out / "shards", 0, 2, range(0, 4), images, images, model, extract)
    done = _launch(model_dir, images, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 0 of 2: finished in an earlier run, reused" in done.stderr
    _assert_same_gallery(out, single)


@pytest.mark.slow
def test_a_shard_of_another_model_stops_the_run(model_dir, images, tmp_path):
    out = tmp_path / "gallery"
    ids = images
    write_shard(out / "shards", 0, 2, range(0, 4), ids[:4], _part(ids, 0, 4), "another-model")
    done = _launch(model_dir, images, out)
    assert done.returncode != 0
    assert "extracted with another-model" in done.stderr and f"rm -r {out / 'shards'}" in (
        done.stderr
    )
