"""GalleryIndex: exact search, add, save/load, torch and faiss agree; `sureid extract`."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

from sureid import SureidError, SureidStudentConfig, SureidStudentModel
from sureid.cli import main
from sureid.gallery import GalleryIndex

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def features():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(200, 32, generator=gen), torch.randn(15, 32, generator=gen)


def test_exact_search_by_cosine_similarity(features):
    gallery, queries = features
    ids = [f"img_{i}.jpg" for i in range(len(gallery))]
    index = GalleryIndex(gallery, ids=ids)
    assert len(index) == 200 and index.dim == 32
    hits = index.search(queries, k=5)
    sims = (
        torch.nn.functional.normalize(queries, dim=1)
        @ torch.nn.functional.normalize(gallery, dim=1).T
    )
    top = sims.topk(5, dim=1)
    assert torch.equal(hits.indices, top.indices)
    torch.testing.assert_close(hits.scores, top.values)
    assert hits.ids[0] == [ids[j] for j in top.indices[0].tolist()]
    # a gallery image finds itself first, with similarity 1, whatever its norm
    self_hit = index.search(gallery[7] * 3.0, k=1)
    assert self_hit.indices.tolist() == [[7]] and self_hit.scores.item() == pytest.approx(1.0)
    assert index.search(queries[:2], k=1000).indices.shape == (2, 200)  # k capped


def test_inner_product_metric_keeps_the_norms():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    query = torch.tensor([[1.0, 0.5]])
    assert GalleryIndex(gallery).search(query, k=1).indices.item() == 0  # cosine
    assert GalleryIndex(gallery, metric="ip").search(query, k=1).indices.item() == 1


def test_add_extends_ids_and_positions(features):
    gallery, _ = features
    index = GalleryIndex(gallery[:50])
    index.add(gallery[50:120])
    index.add(gallery[120:], ids=[f"x{i}" for i in range(80)])
    assert len(index) == 200 and index.ids[:2] == [0, 1] and index.ids[119] == 119
    assert index.ids[120] == "x0"
    assert index.search(gallery[150], k=1).ids == [["x30"]]
    index.add(np.zeros((1, 32), np.float32) + 1, ids=[np.int64(5)])  # numpy input and id
    assert index.ids[-1] == 5 and isinstance(index.ids[-1], int)


def test_argument_errors(features):
    gallery, _ = features
    with pytest.raises(SureidError, match="empty"):
        GalleryIndex().search(gallery[:1])
    index = GalleryIndex(gallery)
    with pytest.raises(ValueError, match="33 channels but the gallery has 32"):
        index.search(torch.randn(1, 33))
    with pytest.raises(ValueError, match="2 ids for 3"):
        index.add(gallery[:3], ids=["a", "b"])
    with pytest.raises(SureidError, match="strings or integers"):
        index.add(gallery[:1], ids=[1.5])
    with pytest.raises(ValueError, match="NaN"):
        index.add(torch.full((1, 32), float("nan")))
    with pytest.raises(ValueError, match="backend"):
        GalleryIndex(backend="annoy")


def test_save_and_load_round_trip(features, tmp_path):
    gallery, queries = features
    index = GalleryIndex(gallery, ids=[f"p{i}" for i in range(200)])
    index.save(tmp_path / "g")
    assert (tmp_path / "g" / "gallery.safetensors").is_file()
    meta = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert meta["size"] == 200 and meta["dim"] == 32 and meta["metric"] == "cosine"
    loaded = GalleryIndex.load(tmp_path / "g")
    assert loaded.ids == index.ids
    a, b = index.search(queries, k=10), loaded.search(queries, k=10)
    assert torch.equal(a.indices, b.indices) and a.ids == b.ids
    torch.testing.assert_close(a.scores, b.scores)
    with pytest.raises(FileNotFoundError, match="gallery.json"):
        GalleryIndex.load(tmp_path / "nothing-here")
    (tmp_path / "g" / "gallery.json").write_text(json.dumps({**meta, "ids": ["a"]}))
    with pytest.raises(SureidError, match="do not belong together"):
        GalleryIndex.load(tmp_path / "g")


def test_torch_and_faiss_give_the_same_answers(features, tmp_path):
    pytest.importorskip("faiss")
    gallery, queries = features
    ids = [f"g{i}" for i in range(200)]
    exact = GalleryIndex(gallery[:120], ids=ids[:120])
    fast = GalleryIndex(gallery[:120], ids=ids[:120], backend="faiss")
    exact.add(gallery[120:], ids=ids[120:])
    fast.add(gallery[120:], ids=ids[120:])
    a, b = exact.search(queries, k=10), fast.search(queries, k=10)
    assert torch.equal(a.indices, b.indices) and a.ids == b.ids
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    # a faiss gallery saves the same files; either backend loads them
    fast.save(tmp_path / "f")
    reloaded = GalleryIndex.load(tmp_path / "f", backend="torch").search(queries, k=10)
    assert torch.equal(reloaded.indices, a.indices)
    torch.testing.assert_close(fast.features, exact.features, atol=1e-6, rtol=0)


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install sureid\[faiss\]"):
        GalleryIndex(torch.randn(3, 4), backend="faiss")


def test_cli_extract_saves_a_searchable_gallery(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.7)
    SureidStudentModel(config).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"crop{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    args = ["extract", "--model", str(model_dir), "--out", str(tmp_path / "gallery")]
    images = [str(p) for p in (paths[0], broken, paths[1], paths[2])]
    assert main(args + ["--images", *images]) == 2  # raises by default, naming the file
    assert "broken.jpg" in capsys.readouterr().err
    assert main(args + ["--skip-errors", "--images", *images]) == 0
    captured = capsys.readouterr()
    assert "saved 3 embeddings" in captured.out and "broken.jpg" in captured.err
    index = GalleryIndex.load(tmp_path / "gallery")
    assert index.ids == [str(p) for p in paths]
    assert index.search(index.features[1], k=1).ids == [[str(paths[1])]]


def test_saved_gallery_records_its_model_and_skipped_inputs(features, tmp_path):
    from sureid.inference import SkippedInput

    gallery, _ = features
    skipped = [SkippedInput(4, "crops/x.jpg", "cannot read crops/x.jpg as an image")]
    index = GalleryIndex(gallery[:3], ids=["a", "b", "c"], model="ckpt/student", skipped=skipped)
    index.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert meta["model"] == "ckpt/student"
    assert meta["skipped"] == [
        {"index": 4, "source": "crops/x.jpg", "error": "cannot read crops/x.jpg as an image"}
    ]
    loaded = GalleryIndex.load(tmp_path / "g")
    assert loaded.model == "ckpt/student" and loaded.skipped == skipped
    # dicts (as in gallery.json) and (index, source, error) tuples are taken too
    assert GalleryIndex(skipped=[(4, "crops/x.jpg", "cannot read")]).skipped[0].index == 4


def test_a_gallery_saved_before_the_records_still_loads(features, tmp_path):
    gallery, _ = features
    GalleryIndex(gallery[:2], ids=["a", "b"]).save(tmp_path / "g")
    meta_path = tmp_path / "g" / "gallery.json"
    meta = json.loads(meta_path.read_text())
    old = {k: meta[k] for k in ("format", "version", "metric", "dim", "size", "ids")}
    meta_path.write_text(json.dumps(old))  # the keys a version-1 gallery had at first
    loaded = GalleryIndex.load(tmp_path / "g")
    assert loaded.ids == ["a", "b"] and loaded.model is None and loaded.skipped == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_umask_permissions(features, tmp_path, umask, mode):
    """safetensors writes owner-only files (0600) whatever the umask; gallery.json did not."""
    gallery, _ = features
    previous = os.umask(umask)
    try:
        GalleryIndex(gallery[:2]).save(tmp_path / "g")
    finally:
        os.umask(previous)
    for name in ("gallery.safetensors", "gallery.json"):
        assert stat.S_IMODE((tmp_path / "g" / name).stat().st_mode) == mode, name
