"""sureid.index.AnnIndex and ``sureid index build`` / ``sureid search --index``: small random
clustered galleries (dim 64), no network."""

from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from sureid.cli import main  # noqa: E402
from sureid.configuration_sureid import SureidError  # noqa: E402
from sureid.gallery import GalleryIndex  # noqa: E402
from sureid.index import AnnIndex, IndexParams, default_nlist  # noqa: E402

DIM = 64


def clustered(n, n_ids=None, seed=0, queries=200):
    """``n`` unit vectors: identities (unit centres) with several noisy views, and queries
    that are other views of gallery identities."""
    rng = np.random.default_rng(seed)
    n_ids = n_ids or n // 8
    centres = rng.standard_normal((n_ids, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def views(rows):
        v = centres[rows] + 0.08 * rng.standard_normal((len(rows), DIM)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return views(np.arange(n) % n_ids), views(rng.integers(0, n_ids, queries))


@pytest.fixture(scope="module")
def data():
    return clustered(3000)


def exact_top(gallery, queries, k=10):
    return np.argsort(-(queries @ gallery.T), axis=1)[:, :k]


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_recall_at_1_against_exact_search_is_high(data, kind):
    gallery, queries = data
    index = AnnIndex.build(gallery, type=kind)
    found = index.search(queries, k=10).indices.numpy()
    exact = exact_top(gallery, queries)
    recall1 = np.mean(found[:, 0] == exact[:, 0])
    assert recall1 >= (1.0 if kind == "flat" else 0.9), recall1
    assert index.params.train_size == (None if kind == "flat" else 3000)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_save_load_round_trip_with_int_ids(tmp_path, data, kind):
    gallery, queries = data
    ids = np.arange(1000, 1000 + len(gallery))
    index = AnnIndex.build(gallery, ids, type=kind, model="some/model")
    before = index.search(queries, k=5)
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy", "index.faiss", "index.json"]
    meta = json.loads((tmp_path / "index.json").read_text())
    assert (meta["type"], meta["dim"], meta["count"], meta["model"]) == (
        kind,
        DIM,
        3000,
        "some/model",
    )
    assert np.load(tmp_path / "ids.npy").dtype == np.int64
    loaded = AnnIndex.load(tmp_path)
    after = loaded.search(queries, k=5)
    assert after.ids == before.ids
    assert all(isinstance(i, int) for row in after.ids for i in row)
    assert after.ids[0][0] == 1000 + after.indices[0, 0].item()
    assert loaded.params == index.params and loaded.model == "some/model"


def test_string_ids_are_a_unicode_column(tmp_path, data):
    gallery, queries = data
    ids = [f"img/{i:05d}.jpg" for i in range(len(gallery))]
    AnnIndex.build(gallery, ids, type="flat").save(tmp_path)
    column = np.load(tmp_path / "ids.npy", allow_pickle=False)
    assert column.dtype.kind == "U"
    hits = AnnIndex.load(tmp_path).search(queries[:3], k=2)
    assert all(type(i) is str and i.startswith("img/") for row in hits.ids for i in row)


def test_nprobe_and_ef_search_are_stored_and_overridable(data):
    gallery, queries = data
    ivf = AnnIndex.build(gallery, type="ivfpq", params=IndexParams(nlist=64, nprobe=1))
    exact = exact_top(gallery, queries)[:, 0]
    low = np.mean(ivf.search(queries, k=1).indices.numpy()[:, 0] == exact)
    high = np.mean(ivf.search(queries, k=1, nprobe=64).indices.numpy()[:, 0] == exact)
    assert ivf.params.nprobe == 1 and high > low and high >= 0.95
    hnsw = AnnIndex.build(gallery, type="hnsw", params=IndexParams(ef_search=16))
    assert hnsw.params.ef_search == 16
    wide = hnsw.search(queries, k=1, ef_search=256).indices.numpy()[:, 0]
    assert np.mean(wide == exact) >= 0.95


def test_default_nlist_fits_the_gallery():
    assert default_nlist(3000) == 64  # 4 sqrt(3000) = 219, but 39 * 128 > 3000
    assert default_nlist(1_000_000) == 2048
    assert default_nlist(10) == 1


def test_clear_errors(tmp_path, data):
    gallery, _ = data
    with pytest.raises(FileNotFoundError, match="gallery folder .* not found"):
        AnnIndex.from_gallery(tmp_path / "missing")
    with pytest.raises(SureidError, match="unknown index type 'lsh'.*flat, ivfpq, hnsw"):
        AnnIndex.build(gallery, type="lsh")
    with pytest.raises(SureidError, match=r"nlist=1024 .* 39 x 1024 = 39936 .* gallery has 3000"):
        AnnIndex.build(gallery, type="ivfpq", params=IndexParams(nlist=1024))
    with pytest.raises(SureidError, match="--nlist 64 fits"):
        AnnIndex.build(gallery, type="ivfpq", params=IndexParams(nlist=1024))
    with pytest.raises(SureidError, match="pq_m=7 does not divide"):
        AnnIndex.build(gallery, type="ivfpq", params=IndexParams(pq_m=7))
    with pytest.raises(FileNotFoundError, match="index.json not found"):
        AnnIndex.load(tmp_path)


def test_cli_build_from_a_saved_gallery(tmp_path, data, capsys):
    gallery, queries = data
    ids = [f"g{i}.jpg" for i in range(len(gallery))]
    GalleryIndex(gallery, ids=ids, model="ckpt").save(tmp_path / "gallery")
    argv = ["index", "build", "--gallery", str(tmp_path / "gallery"), "--out"]
    assert main([*argv, str(tmp_path / "hnsw"), "--type", "hnsw", "--hnsw-m", "16"]) == 0
    assert "indexed 3000 vectors (dim 64, hnsw)" in capsys.readouterr().out
    index = AnnIndex.load(tmp_path / "hnsw")
    assert index.model == "ckpt" and index.params.hnsw_m == 16
    assert index.search(queries[:1], k=1).ids[0][0] == ids[exact_top(gallery, queries[:1])[0, 0]]
    assert main([*argv, str(tmp_path / "x"), "--type", "ivfpq", "--nlist", "4096"]) == 2
    err = capsys.readouterr().err
    assert "sureid index: error: too few vectors to train ivfpq: nlist=4096" in err
    assert main(["index", "build", "--gallery", str(tmp_path / "no"), "--out", "o"]) == 2
    assert "not found" in capsys.readouterr().err


def test_search_takes_an_index(monkeypatch, tmp_path, data, capsys):
    """``sureid search --index DIR``: the queries' features go through the index (the model is
    stubbed: this tests the wiring, not extraction)."""
    import sureid.inference

    gallery, queries = data
    ids = [f"g{i}.jpg" for i in range(len(gallery))]
    AnnIndex.build(gallery, ids, type="hnsw", model="ckpt").save(tmp_path / "idx")
    image = tmp_path / "q.jpg"
    image.write_bytes(b"")
    monkeypatch.setattr(sureid.inference, "extract_features", lambda *a, **k: queries[:1])
    argv = ["search", "--index", str(tmp_path / "idx"), "--images", str(image), "--top-k", "3"]
    assert main([*argv, "--ef-search", "128"]) == 0
    out = capsys.readouterr().out
    best = ids[exact_top(gallery, queries[:1])[0, 0]]
    assert out.splitlines()[2].endswith(f"  {best}")  # rank 1
    with pytest.raises(SystemExit):
        main(["search", "--images", str(image)])
    assert "one of the arguments --gallery --index is required" in capsys.readouterr().err
