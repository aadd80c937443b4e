"""The built-in synthetic occluded set, and the data package's import boundary."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sureid.data import load_reid_dataset, make_synthetic_reid, summary
from sureid.data.noda import OccluderBank
from sureid.data.synthetic import Identity, _camera, render

SMALL = dict(num_train_ids=4, num_test_ids=3, images_per_train_id=4, size=(64, 32))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_reid(tmp_path_factory.mktemp("syn"), **SMALL, seed=0)


def test_loads_through_both_names_with_duke_file_names(synthetic_root: Path) -> None:
    ds = load_reid_dataset("synthetic", synthetic_root)
    duke = load_reid_dataset("occluded_duke", synthetic_root)
    assert {k: len(v) for k, v in ds.items()} == {"train": 16, "query": 6, "gallery": 18}
    assert {k: len(v) for k, v in duke.items()} == {k: len(v) for k, v in ds.items()}
    assert "occluded" in ds["query"].column_names and "occluded" not in duke["query"].column_names
    first = ds["train"][0]
    assert re.fullmatch(rf"0001_c{first['camid'] + 1}_f\d{{7}}\.jpg", Path(first["path"]).name)
    image = ds["train"][0]["image"]
    assert image.size == (32, 64) and image.mode == "RGB"
    assert ds["train"]["pid"] == sorted(ds["train"]["pid"]) and set(ds["train"]["pid"]) == {
        0,
        1,
        2,
        3,
    }


def test_protocol_properties(synthetic_root: Path) -> None:
    ds = load_reid_dataset("synthetic", synthetic_root, relabel_train=False)
    train_ids = set(ds["train"]["pid"])
    query, gallery = ds["query"], ds["gallery"]
    assert train_ids == {1, 2, 3, 4}
    assert set(query["pid"]) == set(gallery["pid"]) == {5, 6, 7}  # disjoint from train
    assert all(query["occluded"])  # every query occluded
    assert sum(gallery["occluded"]) < len(gallery) / 2  # gallery mostly not
    for pid, cam in zip(query["pid"], query["camid"], strict=True):  # a match in another camera
        assert any(
            p == pid and c != cam for p, c in zip(gallery["pid"], gallery["camid"], strict=True)
        )
    for pid in train_ids:  # every train identity seen by >= 2 cameras
        cams = {
            c for p, c in zip(ds["train"]["pid"], ds["train"]["camid"], strict=True) if p == pid
        }
        assert len(cams) >= 2
    text = summary(ds, print_table=False)
    assert text.splitlines()[0] == "synthetic" and "query" in text


def test_same_seed_same_bytes_and_reuse(tmp_path: Path, synthetic_root: Path) -> None:
    other = make_synthetic_reid(tmp_path / "again", **SMALL, seed=0)
    a = sorted(p.relative_to(synthetic_root) for p in synthetic_root.rglob("*.jpg"))
    b = sorted(p.relative_to(other) for p in other.rglob("*.jpg"))
    assert a == b
    assert all((synthetic_root / p).read_bytes() == (other / p).read_bytes() for p in a)
    stamp = (other / a[0]).stat().st_mtime_ns
    make_synthetic_reid(other, **SMALL, seed=0)  # same parameters: reused, not rewritten
    assert (other / a[0]).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_reid(other, **SMALL, seed=1)
    make_synthetic_reid(other, **SMALL, seed=1, overwrite=True)
    assert json.loads((other / "sureid_synthetic.json").read_text())["params"]["seed"] == 1
    c = sorted(p.relative_to(other) for p in other.rglob("*.jpg"))
    assert len(c) == len(a)
    assert c != a or any((other / p).read_bytes() != (synthetic_root / p).read_bytes() for p in c)


def test_refuses_foreign_folders_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "query").mkdir()
    with pytest.raises(FileExistsError, match="not made by make_synthetic_reid"):
        make_synthetic_reid(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="num_cameras"):
        make_synthetic_reid(tmp_path / "x", num_cameras=9)


def test_identity_survives_a_resize_to_64x32(synthetic_root: Path) -> None:
    """Images of one person are closer (on the person's pixels) than images of two people."""
    ds = load_reid_dataset("synthetic", synthetic_root)["train"]
    crops = [np.asarray(im.resize((32, 64)), dtype=np.float32)[20:56, 10:22] for im in ds["image"]]
    x = np.stack([c.reshape(-1, 3).mean(0) for c in crops])  # mean colour of the torso/leg area
    pids = np.array(ds["pid"])
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = pids[:, None] == pids[None]
    np.fill_diagonal(same, False)
    diff = pids[:, None] != pids[None]
    assert d[same].mean() < d[diff].mean()


SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def test_every_image_has_its_visible_body_mask(synthetic_root: Path) -> None:
    images = sorted(p for d in SPLIT_DIRS.values() for p in (synthetic_root / d).glob("*.jpg"))
    masks = sorted((synthetic_root / "body_masks").rglob("*.png"))
    assert len(images) == 40 and len(masks) == len(images)
    flags = json.loads((synthetic_root / "sureid_synthetic.json").read_text())["occluded"]
    for image_path in images:
        mask_path = (
            synthetic_root / "body_masks" / image_path.parent.name / f"{image_path.stem}.png"
        )
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            assert mask.size == image.size == (32, 64)
            body = np.asarray(mask.convert("L")) > 127
        share = body.mean()  # a person is there, and it is not the whole image
        assert 0.02 < share < 0.6, (mask_path, share)
    assert any(flags.values()) and not all(flags.values())
    # ... and its occluder: all black where nothing occludes, else some pixels, none of them
    # visible body.
    for image_path in images:
        stem = f"{image_path.parent.name}/{image_path.stem}.png"
        with Image.open(synthetic_root / "occluder_masks" / stem) as occ_png:
            occluder = np.asarray(occ_png.convert("L")) > 127
        with Image.open(synthetic_root / "body_masks" / stem) as body_png:
            body = np.asarray(body_png.convert("L")) > 127
        assert occluder.shape == (64, 32) and not (occluder & body).any()
        assert occluder.any() == flags[f"{image_path.parent.name}/{image_path.name}"], stem
    ds = load_reid_dataset("synthetic", synthetic_root)
    for split, folder in SPLIT_DIRS.items():
        for path, mask_path in zip(ds[split]["path"], ds[split]["body_mask_path"], strict=True):
            expected = synthetic_root / "body_masks" / folder / (Path(path).stem + ".png")
            assert Path(mask_path) == expected and expected.is_file()
        for path, mask_path in zip(ds[split]["path"], ds[split]["occluder_mask_path"], strict=True):
            expected = synthetic_root / "occluder_masks" / folder / (Path(path).stem + ".png")
            assert Path(mask_path) == expected and expected.is_file()
    assert (
        "body_mask_path"
        not in load_reid_dataset("occluded_duke", synthetic_root)["query"].column_names
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_an_occluder_hides_part_of_the_same_persons_body(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    camera, ident = _camera(rng, 64, 32), Identity.sample(rng)
    bank = OccluderBank.builtin(num=4, seed=seed)
    renders, occluders = {}, {}
    for occluded in (False, True):  # the same draws up to the occluder: the same person
        image, body, occluder = render(
            ident, camera, np.random.default_rng(seed), (64, 32), occluded=occluded, bank=bank,
            with_body_mask=True, with_occluder_mask=True,
        )  # fmt: skip
        assert image.size == (32, 64) and body.shape == (64, 32) and body.dtype == bool
        renders[occluded], occluders[occluded] = body, occluder
    clear, hidden = renders[False], renders[True]
    assert not occluders[False].any() and occluders[True].any()
    assert np.array_equal(hidden, clear & ~occluders[True])  # the occluder hides exactly that
    assert clear.sum() > 0
    assert not (hidden & ~clear).any()  # a subset ...
    assert hidden.sum() < clear.sum()  # ... strictly smaller
    plain = render(ident, camera, np.random.default_rng(seed), (64, 32), occluded=False, bank=bank)
    assert isinstance(plain, Image.Image)  # without the flag: the image alone, as before


def test_a_set_without_occluder_masks_names_the_missing_file_and_the_fix(
    tmp_path: Path, synthetic_root: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(synthetic_root, old)
    shutil.rmtree(old / "occluder_masks")  # as a set made before the occluder masks existed
    with pytest.raises(
        FileNotFoundError,
        match=r"occluder_masks/bounding_box_train/0001_c\d_f\d{7}\.png is missing.*no occluder "
        r"masks.*make_synthetic_reid\(root, overwrite=True\)",
    ):
        load_reid_dataset("synthetic", old)
    make_synthetic_reid(old, **SMALL, seed=0, overwrite=True)  # the fix: the same images again
    new = load_reid_dataset("synthetic", old)["query"]
    assert len(new["occluder_mask_path"]) == 6
    with (
        Image.open(new["path"][0]) as a,
        Image.open(synthetic_root / "query" / Path(new["path"][0]).name) as b,
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_set_without_body_masks_names_the_missing_file_and_the_fix(
    tmp_path: Path, synthetic_root: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(synthetic_root, old)
    shutil.rmtree(old / "body_masks")  # as a set made before the masks existed
    with pytest.raises(
        FileNotFoundError,
        match=r"body_masks/bounding_box_train/0001_c\d_f\d{7}\.png is missing.*"
        r"make_synthetic_reid\(root, overwrite=True\)",
    ):
        load_reid_dataset("synthetic", old)
    assert len(load_reid_dataset("occluded_duke", old)["query"]) == 6  # needs no masks
    make_synthetic_reid(old, **SMALL, seed=0, overwrite=True)  # the fix the error names
    assert len(load_reid_dataset("synthetic", old)["query"]["body_mask_path"]) == 6


def test_data_package_imports_no_model_trainer_or_inference_code() -> None:
    """Data flows one way (docs/architecture.md): sureid.data must not import the layers above
    it; from outside the package it reads only configuration_sureid's constants."""
    folder = Path(__file__).resolve().parents[1] / "sureid" / "data"
    forbidden = ("modeling", "trainer", "inference", "evaluation", "losses", "cli")
    for path in folder.glob("*.py"):
        for name in _sureid_imports(path):
            if name.startswith(".."):
                assert name == "..configuration_sureid", f"{path.name} imports {name}"
            assert not any(f in name for f in forbidden), f"{path.name} imports {name}"


def test_modeling_imports_no_data_trainer_or_inference_code() -> None:
    """The model file stands alone (docs/architecture.md): no data, trainer or inference."""
    path = Path(__file__).resolve().parents[1] / "sureid" / "modeling_sureid.py"
    names = _sureid_imports(path)
    assert ".configuration_sureid" in names  # the walk sees the file's imports
    for name in names:
        assert not any(f in name for f in ("data", "trainer", "inference")), name


def _sureid_imports(path: Path) -> list[str]:
    """Relative imports of ``path`` as written (``.x``, ``..y``), at any depth of the file
    (function-level imports included); an absolute ``import sureid...`` fails the test."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level or not (node.module or "").startswith("sureid"), node.module
            if node.level:
                names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("sureid"), f"{path.name}: {alias.name}"
    return names
