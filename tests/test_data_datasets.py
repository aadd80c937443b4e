"""Parsers of the standard ReID layouts, on fake trees with the official file names."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from datasets import DatasetDict
from datasets import Image as ImageFeature
from PIL import Image

from sureid.data import DATASET_NAMES, load_reid_dataset, summary
from sureid.data.datasets import SPECS, canonical_dataset_name
from sureid.evaluation import PROTOCOLS, protocol_for_dataset

_JPEG: bytes | None = None


def _jpeg() -> bytes:
    global _JPEG
    if _JPEG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 16), (200, 30, 30)).save(buf, format="JPEG")
        _JPEG = buf.getvalue()
    return _JPEG


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".tif", ".png"):
            Image.new("RGB", (8, 16), (10, 200, 10)).save(path)
        elif path.suffix.lower() in (".jpg", ".jpeg"):
            path.write_bytes(_jpeg())
        else:
            path.write_bytes(b"not an image")


MARKET_TRAIN = [
    "0002_c1s1_000451_03.jpg",
    "0002_c2s1_000301_01.jpg",
    "0007_c3s3_077419_03.jpg",
    "0010_c6s4_002452_02.jpg",
    "0010_c5s2_127919_01.jpg",
]
MARKET_QUERY = ["0001_c1s1_001051_00.jpg", "0003_c4s6_015641_00.jpg"]
MARKET_GALLERY = [
    "0001_c2s1_000301_01.jpg",
    "0003_c5s3_065187_02.jpg",
    "0000_c1s1_000151_01.jpg",  # distractors: kept
    "0000_c6s4_001102_04.jpg",
    "-1_c1s1_000401_03.jpg",  # junk: left out
    "-1_c3s1_000551_01.jpg",
    "-1_c4s2_012445_06.jpg",
    "Thumbs.db",  # ships with the official release
]


@pytest.fixture
def market(tmp_path: Path) -> Path:
    base = tmp_path / "Market-1501-v15.09.15"
    touch(base / "bounding_box_train", *MARKET_TRAIN)
    touch(base / "query", *MARKET_QUERY)
    touch(base / "bounding_box_test", *MARKET_GALLERY)
    return tmp_path


def test_market_counts_relabel_camids(market: Path) -> None:
    ds = load_reid_dataset("market1501", market)
    assert isinstance(ds, DatasetDict) and set(ds) == {"train", "query", "gallery"}
    train = ds["train"]
    assert len(train) == 5
    # sorted file order: 0002 x2, 0007, 0010 x2 -> relabelled 0, 0, 1, 2, 2
    assert train["pid"] == [0, 0, 1, 2, 2]
    assert sorted(set(train["camid"])) == [0, 1, 2, 4, 5]  # c1..c6 -> 0..5
    cams = dict(zip([Path(p).name for p in train["path"]], train["camid"], strict=True))
    assert cams["0002_c1s1_000451_03.jpg"] == 0 and cams["0010_c6s4_002452_02.jpg"] == 5
    assert ds["query"]["pid"] == [1, 3]  # original ids
    assert ds["query"]["camid"] == [0, 3]
    gallery = ds["gallery"]
    assert len(gallery) == 4  # 3 junk and Thumbs.db left out
    assert sorted(gallery["pid"]) == [0, 0, 1, 3]
    assert -1 not in gallery["pid"]
    assert isinstance(ds["train"].features["image"], ImageFeature)
    assert "occluded" not in ds["train"].column_names


def test_images_decode_lazily(market: Path) -> None:
    ds = load_reid_dataset("market1501", market)
    sample = ds["train"][0]
    assert isinstance(sample["image"], Image.Image)
    assert sample["image"].size == (8, 16)
    assert sample["path"].endswith("0002_c1s1_000451_03.jpg")


def test_summary_counts_junk_and_distractors(market: Path) -> None:
    text = summary(load_reid_dataset("market1501", market), print_table=False)
    lines = text.splitlines()
    assert lines[0] == "market1501"
    row = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert row["train"] == ["3", "5", "5", "-"]
    assert row["gallery"] == ["3", "4", "4", "-"]
    assert "gallery: 3 junk images (pid -1) left out" in text
    assert "gallery: 2 distractor images (pid 0)" in text
    assert "1 non-image files ignored" in text


def test_root_may_be_the_release_folder_itself(market: Path) -> None:
    ds = load_reid_dataset("market", market / "Market-1501-v15.09.15")
    assert len(ds["train"]) == 5


def test_duke_and_occluded_duke(tmp_path: Path) -> None:
    for folder, name in (("DukeMTMC-reID", "dukemtmc"), ("Occluded_Duke", "occluded_duke")):
        base = tmp_path / folder
        touch(base / "bounding_box_train", "0005_c2_f0046985.jpg", "0005_c5_f0051341.jpg")
        touch(base / "bounding_box_train", "0008_c8_f0161204.jpg")
        touch(base / "query", "0017_c1_f0081541.jpg")
        touch(base / "bounding_box_test", "0017_c7_f0094421.jpg", "0019_c3_f0012000.jpg")
        ds = load_reid_dataset(name, tmp_path)
        assert ds["train"]["pid"] == [0, 0, 1]
        assert ds["train"]["camid"] == [1, 4, 7]
        assert ds["query"]["pid"] == [17] and ds["query"]["camid"] == [0]
        assert ds["gallery"]["pid"] == [17, 19] and ds["gallery"]["camid"] == [6, 2]


def test_a_name_the_loader_takes_has_a_protocol(tmp_path: Path) -> None:
    """One table, one alias rule: every name load_reid_dataset accepts has a protocol too."""
    base = tmp_path / "DukeMTMC-reID"
    touch(base / "bounding_box_train", "0005_c2_f0046985.jpg")
    touch(base / "query", "0017_c1_f0081541.jpg")
    touch(base / "bounding_box_test", "0017_c7_f0094421.jpg")
    for name in ("DukeMTMC-reID", "dukemtmc_reid", "Duke", "dukemtmc"):
        assert canonical_dataset_name(name) == "dukemtmc"
        assert load_reid_dataset(name, tmp_path)["query"]["pid"] == [17]
        assert protocol_for_dataset(name) == "market"
    assert canonical_dataset_name("Market-1501") == "market1501"
    assert protocol_for_dataset("Occluded-REID") == protocol_for_dataset("Partial_REID") == "cross"
    for key, spec in SPECS.items():
        assert spec.protocol in PROTOCOLS
        for name in (key, *spec.aliases):
            assert canonical_dataset_name(name.upper()) == key
            assert protocol_for_dataset(name) == spec.protocol


def test_occluded_reid_test_only_set(tmp_path: Path) -> None:
    base = tmp_path / "Occluded_REID"
    touch(base / "occluded_body_images" / "001", "001_01.tif", "001_02.tif")
    touch(base / "occluded_body_images" / "002", "002_01.tif")
    touch(base / "whole_body_images" / "001", "001_01.tif")
    touch(base / "whole_body_images" / "002", "002_01.tif", "002_02.tif")
    ds = load_reid_dataset("occluded_reid", tmp_path)
    assert set(ds) == {"query", "gallery"}
    assert ds["query"]["pid"] == [1, 1, 2] and set(ds["query"]["camid"]) == {0}
    assert ds["gallery"]["pid"] == [1, 2, 2] and set(ds["gallery"]["camid"]) == {1}
    assert all(ds["query"]["occluded"]) and not any(ds["gallery"]["occluded"])
    assert ds["query"][0]["image"].mode == "RGB"


def test_partial_reid(tmp_path: Path) -> None:
    base = tmp_path / "Partial_REID"
    touch(base / "partial_body_images", "001_1.jpg", "001_2.jpg", "060_1.jpg")
    touch(base / "whole_body_images", "001_1.jpg", "060_1.jpg", "060_2.jpg")
    ds = load_reid_dataset("partial_reid", tmp_path)
    assert ds["query"]["pid"] == [1, 1, 60] and set(ds["query"]["camid"]) == {0}
    assert ds["gallery"]["pid"] == [1, 60, 60] and set(ds["gallery"]["camid"]) == {1}


def test_cross_domain_is_one_call_each(market: Path) -> None:
    base = market / "Partial_REID"
    touch(base / "partial_body_images", "001_1.jpg")
    touch(base / "whole_body_images", "001_1.jpg")
    train = load_reid_dataset("market1501", market)["train"]
    test = load_reid_dataset("partial_reid", market)
    assert len(train) == 5 and len(test["query"]) == 1


def test_generic_folder_layout(tmp_path: Path) -> None:
    touch(tmp_path / "train" / "7", "a_c2.jpg", "b_c3.jpg")
    touch(tmp_path / "train" / "3", "x.png")
    touch(tmp_path / "query" / "12", "q_c1.jpg")
    touch(tmp_path / "gallery" / "12", "g.jpg", "h_c4.jpg")
    ds = load_reid_dataset("folder", tmp_path)
    assert ds["train"]["pid"] == [0, 1, 1]  # folder 3 -> 0, folder 7 -> 1
    assert ds["train"]["camid"] == [0, 1, 2]  # no _c -> 0; _c2 -> 1; _c3 -> 2
    assert ds["query"]["pid"] == [12] and ds["query"]["camid"] == [0]
    assert ds["gallery"]["camid"] == [1, 3]  # no _c in the gallery -> 1


def test_person_folders_without_images_are_counted_and_reported(tmp_path: Path, caplog) -> None:
    touch(tmp_path / "train" / "7", "a_c2.jpg")
    touch(tmp_path / "train" / "3", "notes.txt")  # no image: this id has nothing to train on
    (tmp_path / "train" / "9").mkdir()
    touch(tmp_path / "query" / "12", "q_c1.jpg")
    touch(tmp_path / "gallery" / "12", "g.jpg")
    with caplog.at_level(logging.WARNING):
        ds = load_reid_dataset("folder", tmp_path)
    assert ds["train"]["pid"] == [0]
    assert f"2 person folders have no images (first: {tmp_path / 'train' / '3'})" in caplog.text
    assert "train: 2 person folders without images (3, 9)" in summary(ds, print_table=False)


def test_only_the_splits_asked_for_are_read(market: Path) -> None:
    touch(market / "Market-1501-v15.09.15" / "query", "holiday.jpg")  # would raise if read
    gallery = load_reid_dataset("market1501", market, splits=["gallery"])
    assert list(gallery) == ["gallery"] and len(gallery["gallery"]) == 4
    with pytest.raises(ValueError, match="holiday.jpg"):
        load_reid_dataset("market1501", market, splits=["query", "gallery"])
    with pytest.raises(ValueError, match=r"splits \['train', 'query', 'gallery'\].*\['test'\]"):
        load_reid_dataset("market1501", market, splits=["test"])


def test_generic_folder_needs_train_or_query_and_gallery(tmp_path: Path) -> None:
    touch(tmp_path / "query" / "1", "a.jpg")
    with pytest.raises(FileNotFoundError, match="gallery"):
        load_reid_dataset("folder", tmp_path)


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set name 'cuhk03'") as err:
        load_reid_dataset("cuhk03", tmp_path)
    assert all(name in str(err.value) for name in DATASET_NAMES)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_reid_dataset("market1501", missing)


def test_layout_mismatch_names_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Market-1501-v15.09.15"):
        load_reid_dataset("market1501", tmp_path)
    base = tmp_path / "Market-1501-v15.09.15"
    touch(base / "bounding_box_train", *MARKET_TRAIN)
    touch(base / "bounding_box_test", *MARKET_GALLERY)
    with pytest.raises(FileNotFoundError, match=str(base / "query")):
        load_reid_dataset("market1501", tmp_path)


def test_bad_file_name_raises_naming_the_file(market: Path) -> None:
    touch(market / "Market-1501-v15.09.15" / "query", "holiday.jpg")
    with pytest.raises(ValueError, match="holiday.jpg.*0002_c1s1_000451_03.jpg"):
        load_reid_dataset("market1501", market)


def test_bad_file_names_counted_when_not_strict(market: Path, caplog) -> None:
    touch(market / "Market-1501-v15.09.15" / "query", "holiday.jpg")
    with caplog.at_level(logging.WARNING):
        ds = load_reid_dataset("market1501", market, strict=False)
    assert len(ds["query"]) == 2
    assert "holiday.jpg" in caplog.text
    assert "query: 1 files with unparsable names left out" in summary(ds, print_table=False)


def test_camera_out_of_range(market: Path) -> None:
    touch(market / "Market-1501-v15.09.15" / "query", "0001_c7s1_001051_00.jpg")
    with pytest.raises(ValueError, match="c7.*c1..c6"):
        load_reid_dataset("market1501", market)


def test_empty_split_folder(tmp_path: Path) -> None:
    base = tmp_path / "DukeMTMC-reID"
    touch(base / "bounding_box_train", "0005_c2_f0046985.jpg")
    touch(base / "bounding_box_test", "0005_c1_f0046985.jpg")
    (base / "query").mkdir()
    with pytest.raises(ValueError, match="no images found in .*query.*0005_c2_f0046985.jpg"):
        load_reid_dataset("dukemtmc", tmp_path)


def test_synthetic_name_needs_its_metadata(tmp_path: Path) -> None:
    touch(tmp_path / "bounding_box_train", "0005_c2_f0046985.jpg")
    touch(tmp_path / "query", "0006_c2_f0046985.jpg")
    touch(tmp_path / "bounding_box_test", "0006_c1_f0046985.jpg")
    with pytest.raises(FileNotFoundError, match="sureid_synthetic.json"):
        load_reid_dataset("synthetic", tmp_path)
    assert len(load_reid_dataset("occluded_duke", tmp_path)["train"]) == 1


def test_synthetic_loader_adds_each_images_body_mask(tmp_path: Path) -> None:
    names = {
        "bounding_box_train": "0005_c2_f0046985.jpg",
        "query": "0006_c2_f0046986.jpg",
        "bounding_box_test": "0006_c1_f0046987.jpg",
    }
    for folder, name in names.items():
        touch(tmp_path / folder, name)
    meta = {"occluded": {f"{folder}/{name}": folder == "query" for folder, name in names.items()}}
    (tmp_path / "sureid_synthetic.json").write_text(json.dumps(meta))
    for folder, name in list(names.items())[:2]:  # the gallery's mask is missing
        touch(tmp_path / "body_masks" / folder, name.replace(".jpg", ".png"))
    for folder, name in names.items():
        touch(tmp_path / "occluder_masks" / folder, name.replace(".jpg", ".png"))
    missing = tmp_path / "body_masks" / "bounding_box_test" / "0006_c1_f0046987.png"
    with pytest.raises(
        FileNotFoundError, match=rf"{re.escape(str(missing))} is missing.*overwrite=True"
    ):
        load_reid_dataset("synthetic", tmp_path)
    touch(missing.parent, missing.name)
    ds = load_reid_dataset("synthetic", tmp_path)
    for split, folder in (("train", "bounding_box_train"), ("query", "query")):
        expected = tmp_path / "body_masks" / folder / names[folder].replace(".jpg", ".png")
        assert ds[split]["body_mask_path"] == [str(expected)]
        occluder = tmp_path / "occluder_masks" / folder / names[folder].replace(".jpg", ".png")
        assert ds[split]["occluder_mask_path"] == [str(occluder)]
    assert ds["query"]["occluded"] == [True] and ds["gallery"]["occluded"] == [False]
    duke = load_reid_dataset("occluded_duke", tmp_path)["query"].features
    assert "body_mask_path" not in duke and "occluder_mask_path" not in duke
