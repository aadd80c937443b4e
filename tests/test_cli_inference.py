"""What a newcomer trips on in the inference commands (issue 23): folders as --images, output
paths checked before the work, skipped inputs listed once and saved with the gallery, --help
that says the defaults, --dtype, `sureid search`, kept-token titles that fit their cells."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sureid.cli import build_parser, main
from sureid.gallery import GalleryIndex

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"sureid {command}: error:")]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def _save_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """A folder of crops: three images in two subfolders, upper-case extensions among them, a
    text file (not an image) and a corrupt jpg at the top."""
    root = tmp_path_factory.mktemp("crops")
    _save_png(root / "b" / "p2.png", 2)
    _save_png(root / "a" / "p1.PNG", 1)
    _save_png(root / "a" / "p0.png", 0)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def _files(crops: Path) -> list[str]:
    """The fixture's three crops and its corrupt jpg as files (index 3: the corrupt one)."""
    return [str(crops / n) for n in ("a/p0.png", "a/p1.PNG", "b/p2.png", "broken.jpg")]


@pytest.fixture
def unwritable(tmp_path):
    """A folder no one can write into: a read-only folder, or (as root, who writes anywhere) a
    path under a regular file, which cannot be created by anyone."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root
            (tmp_path / "file.txt").write_text("a file, not a folder")
            yield tmp_path / "file.txt"
        else:
            yield folder
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------------------------
# 1. Folders as --images: one library function
# --------------------------------------------------------------------------------------------


def test_list_images_expands_folders_recursively_in_sorted_order(crops, tmp_path):
    from sureid.inference import list_images

    found = list_images([crops])
    assert found == [
        str(crops / "a" / "p0.png"),
        str(crops / "a" / "p1.PNG"),  # extensions in any case
        str(crops / "b" / "p2.png"),
        str(crops / "broken.jpg"),  # an image by its name; reading it decides
    ]
    # files as given, in the order given, mixed with folders; a single path works too
    mixed = list_images([crops / "notes.txt", crops / "b", str(crops / "a" / "p0.png")])
    assert mixed == [str(crops / "notes.txt"), str(crops / "b" / "p2.png")] + [
        str(crops / "a" / "p0.png")
    ]
    assert list_images(crops / "b") == [str(crops / "b" / "p2.png")]


def test_list_images_names_a_missing_path_and_an_empty_folder(crops, tmp_path):
    from sureid.inference import list_images

    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such file or folder"):
        list_images([crops, missing])
    assert list_images([missing], missing="keep") == [str(missing)]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no pictures here")
    with pytest.raises(ValueError, match=f"no image files in the folder {empty} "):
        list_images([empty])


def test_extract_accepts_a_folder(model_dir, crops, tmp_path, capsys):
    out = tmp_path / "gallery"
    command = ["extract", "--model", str(model_dir), "--images", str(crops / "a"), "--out"]
    assert main([*command, str(out), "--device", "cpu"]) == 0
    assert "saved 2 embeddings" in capsys.readouterr().out
    assert GalleryIndex.load(out).ids == [str(crops / "a" / "p0.png"), str(crops / "a" / "p1.PNG")]


def test_example_fails_on_an_empty_folder_like_the_command(
    model_dir, tmp_path, monkeypatch, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "gallery"
    argv = ["--model", str(model_dir), "--images", str(empty), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["extract_features.py", *argv])
    with pytest.raises(SystemExit, match="^2$"):
        runpy.run_path("examples/extract_features.py", run_name="__main__")
    assert f"no image files in the folder {empty}" in capsys.readouterr().err
    assert not out.exists()
    assert main(["extract", "--model", str(model_dir), "--images", str(empty), "--out", str(out)])
    assert f"no image files in the folder {empty}" in _error_line(
        capsys.readouterr().err, "extract"
    )


# --------------------------------------------------------------------------------------------
# 2. Output paths checked before any model runs
# --------------------------------------------------------------------------------------------


def test_every_output_path_is_checked_before_the_model_loads(unwritable, crops, tmp_path, capsys):
    """The model does not exist: a command that reached it would fail naming the checkpoint."""
    model = str(tmp_path / "no-such-model")
    out = unwritable / "out"
    image = str(crops / "a" / "p0.png")
    commands = {
        "extract": ["--images", image, "--out", str(out)],
        "evaluate": ["--dataset", "synthetic", "--root", str(tmp_path / "d"), "--out", f"{out}.json"],
        "visualize": ["--images", image, "--out", str(out)],
        "export-onnx": ["--out", f"{out}.onnx"],
        "search": ["--gallery", str(tmp_path / "g"), "--images", image, "--out", f"{out}.png"],
    }  # fmt: skip
    for command, options in commands.items():
        assert main([command, "--model", model, *options]) == 2, command
        line = _error_line(capsys.readouterr().err, command)
        assert f"--out {out}" in line and str(unwritable) in line, line
        assert "pick" in line and "checkpoint" not in line, line
    assert not (tmp_path / "d").exists()  # nor was the synthetic set generated


def test_output_path_checks(tmp_path):
    from sureid.paths import check_output_file, check_output_folder

    (tmp_path / "file.txt").write_text("x")
    check_output_folder(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is made
    check_output_file(tmp_path / "new" / "results.json")
    assert not (tmp_path / "new").exists()
    with pytest.raises(NotADirectoryError, match="file.txt is a file, not a folder"):
        check_output_folder(tmp_path / "file.txt")
    with pytest.raises(IsADirectoryError, match=r"is a folder; name a file in it \(e\.g\."):
        check_output_file(tmp_path, example="results.json")
    with pytest.raises(NotADirectoryError, match="file.txt is a file, not a folder"):
        check_output_file(tmp_path / "file.txt" / "results.json")
    deep = tmp_path / "file.txt" / "sub" / "results.json"
    with pytest.raises(NotADirectoryError, match=f"^--out {deep}: cannot create the folder"):
        check_output_file(deep)


# --------------------------------------------------------------------------------------------
# 3. Skipped inputs: listed once, in CLI terms, and saved with the gallery
# --------------------------------------------------------------------------------------------


def test_extract_lists_each_skipped_input_once_and_saves_the_list(
    model_dir, crops, tmp_path, capsys, caplog
):
    out = tmp_path / "gallery"
    command = ["extract", "--model", str(model_dir), "--images", *_files(crops), "--out", str(out)]
    with caplog.at_level("WARNING"):
        assert main([*command, "--skip-errors", "--device", "cpu"]) == 0
    # the library's own log lines (which a console shows as well) stay off
    assert not [r for r in caplog.records if r.name.startswith("sureid")], caplog.text
    err = capsys.readouterr().err
    broken = str(crops / "broken.jpg")
    assert len([line for line in err.splitlines() if broken in line]) == 1, err
    assert f"skipped input 3 ({broken})" in err and "FeatureResult" not in err
    meta = json.loads((out / "gallery.json").read_text())
    assert [(s["index"], s["source"]) for s in meta["skipped"]] == [(3, broken)]
    assert meta["model"] == str(model_dir.resolve())
    index = GalleryIndex.load(out)
    assert [s.source for s in index.skipped] == [broken] and len(index) == 3
    assert index.model == str(model_dir.resolve())


@pytest.mark.slow
def test_a_console_shows_the_skipped_list_once(model_dir, crops, tmp_path):
    """Outside pytest no handler catches the library's warnings: they went to stderr too."""
    script = Path(sys.executable).with_name("sureid")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "sureid.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "extract", "--model", str(model_dir), "--images", *_files(crops)[1:],
         "--out", str(tmp_path / "g"), "--skip-errors", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped input 2") == 1, done.stderr
    assert "FeatureResult" not in done.stderr
    assert f"skipped 1 of 3 inputs (listed above and in {tmp_path / 'g'}/gallery.json)" in (
        done.stderr
    )


# --------------------------------------------------------------------------------------------
# 4. --help says the defaults; --dtype; visualize --dataset alone; titles that fit
# --------------------------------------------------------------------------------------------


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


def test_extract_help_says_the_default_split():
    assert "default: gallery" in _help("extract")
    assert "folders" in _help("extract")  # --images takes folders, and says so


def test_dtype_reaches_the_extraction(model_dir, crops, tmp_path, monkeypatch, capsys):
    import sureid.evaluation
    import sureid.inference

    seen = {}
    extract = sureid.inference.extract_features

    def spy(*args, **kwargs):
        seen["extract"] = kwargs.get("dtype")
        return extract(*args, **kwargs)

    monkeypatch.setattr(sureid.inference, "extract_features", spy)
    command = ["extract", "--model", str(model_dir), "--images", *_files(crops)[:2]]
    command += ["--out", str(tmp_path / "g"), "--device", "cpu"]
    assert main([*command, "--dtype", "float32"]) == 0 and seen["extract"] == "float32"
    assert main(command) == 0 and seen["extract"] == "auto"

    def evaluate_model(*args, dtype=None, **kwargs):
        seen["evaluate"] = dtype
        raise ValueError("stop here")

    monkeypatch.setattr(sureid.evaluation, "evaluate_model", evaluate_model)
    root = tmp_path / "folder-set"
    for split, pid in (("query", 1), ("gallery", 1)):
        _save_png(root / split / str(pid) / f"{split}_c1.png", pid)
    command = ["evaluate", "--model", str(model_dir), "--dataset", "folder", "--root", str(root)]
    assert main([*command, "--dtype", "bfloat16"]) == 2 and seen["evaluate"] == "bfloat16"
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^2$"):
        main([*command, "--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def _ink_columns(png: np.ndarray, rows: slice) -> np.ndarray:
    """Which pixel columns of ``png`` (RGB) hold anything but white within ``rows``."""
    return (png[rows] < 200).any(axis=2).any(axis=0)


def test_kept_token_titles_fit_their_cells(model_dir, crops, tmp_path, capsys):
    from sureid.visualize import KEPT_LAYOUT

    folder = tmp_path / "long-names"
    for i in range(3):
        _save_png(folder / f"{i:04d}_c1s1_000151_01_a_rather_long_file_name_of_a_crop.png", i)
    out = tmp_path / "pictures"
    images = sorted(str(p) for p in folder.iterdir())
    command = ["visualize", "--model", str(model_dir), "--images", *images, "--out", str(out)]
    assert main([*command, "--device", "cpu"]) == 0
    with Image.open(out / "kept_tokens.png") as image:
        png = np.asarray(image.convert("RGB"))
    dpi = 100
    left, (gx, _), title = KEPT_LAYOUT["left"], KEPT_LAYOUT["gap"], KEPT_LAYOUT["title"]
    ink = _ink_columns(png, slice(0, int(title * dpi) - 2))  # the title band, above the cells
    assert ink.any()  # the titles are drawn
    starts = [round((left + c * (1.0 + gx)) * dpi) for c in range(3)]  # cell_width 1 inch
    outside = np.ones_like(ink)
    for x in starts:
        outside[x - 1 : x + dpi + 1] = False
    assert not ink[outside].any(), np.flatnonzero(ink & outside)  # nothing spills over


def test_visualize_a_dataset_alone_draws_the_first_queries_kept_tokens(
    model_dir, tiny_synthetic_root, tmp_path, capsys
):
    from sureid import SureidModel
    from sureid.data import load_reid_dataset
    from sureid.visualize import plot_kept_tokens

    out = tmp_path / "pictures"
    command = ["visualize", "--model", str(model_dir), "--dataset", "synthetic", "--root"]
    command += [str(tiny_synthetic_root), "--out", str(out), "--num-queries", "2"]
    assert main([*command, "--top-k", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for name in ("kept_tokens.png", "cmc.png", "ranked.png"):
        assert f"wrote {out / name}" in printed
    query = load_reid_dataset("synthetic", tiny_synthetic_root, splits=["query"])["query"]
    paths = [str(p) for p in query["path"][:2]]
    reference = plot_kept_tokens(
        SureidModel.from_pretrained(model_dir),
        paths,
        tmp_path / "reference.png",
        titles=[Path(p).name for p in paths],
    )
    with Image.open(out / "kept_tokens.png") as a, Image.open(reference) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_visualize_a_dataset_with_a_teacher_says_there_are_no_kept_tokens(
    tiny_synthetic_root, tmp_path, capsys
):
    from sureid import SureidTeacherConfig, SureidTeacherModel

    teacher = tmp_path / "teacher"
    SureidTeacherModel(SureidTeacherConfig(**TINY)).save_pretrained(teacher)
    out = tmp_path / "pictures"
    command = ["visualize", "--model", str(teacher), "--dataset", "synthetic", "--root"]
    assert main([*command, str(tiny_synthetic_root), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "no kept-token figure: SureidTeacherModel drops no tokens" in captured.err
    assert (out / "cmc.png").is_file() and not (out / "kept_tokens.png").exists()


# --------------------------------------------------------------------------------------------
# 5. sureid search
# --------------------------------------------------------------------------------------------


def test_search_ranks_a_saved_gallery_with_the_model_it_records(model_dir, crops, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    command = ["extract", "--model", str(model_dir), "--images", *_files(crops)[:3]]
    assert main([*command, "--out", str(gallery), "--device", "cpu"]) == 0
    capsys.readouterr()
    query = crops / "b" / "p2.png"
    ranked = tmp_path / "ranked.png"
    command = ["search", "--gallery", str(gallery), "--images", str(query), str(crops / "a")]
    assert main([*command, "--top-k", "2", "--out", str(ranked), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    blocks = printed.strip().split("\n\n")
    assert len(blocks) == 3  # a table per query: p2, then the folder's p0 and p1
    lines = blocks[0].splitlines()
    assert lines[0] == f"query 1/3: {query}"
    assert lines[1].split() == ["rank", "score", "gallery", "id"]
    rank, score, gid = lines[2].split()
    assert (rank, gid) == ("1", str(query)) and float(score) == pytest.approx(1.0, abs=1e-3)
    assert len(lines) == 4 and lines[3].split()[0] == "2"
    assert blocks[1].splitlines()[2].split()[2] == str(crops / "a" / "p0.png")
    assert f"wrote {ranked}" in printed
    with Image.open(ranked) as image:
        assert image.size[0] > 0 and image.size[1] > image.size[0]  # three rows of tall crops


def test_search_without_a_recorded_model_asks_for_one(model_dir, crops, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    GalleryIndex(torch.randn(2, 64), ids=["x.png", "y.png"]).save(gallery)  # records no model
    command = ["search", "--gallery", str(gallery), "--images", str(crops / "a" / "p0.png")]
    assert main(command) == 2
    line = _error_line(capsys.readouterr().err, "search")
    assert f"{gallery / 'gallery.json'} does not record the model" in line and "--model" in line
    assert main([*command, "--model", str(model_dir), "--device", "cpu", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "1"
    assert main([*command, "--gallery", str(tmp_path / "nothing")]) == 2
    assert "gallery.safetensors not found" in _error_line(capsys.readouterr().err, "search")
    moved = tmp_path / "moved-model"
    GalleryIndex(torch.randn(2, 64), ids=["x.png", "y.png"], model=moved).save(gallery)
    assert main(command) == 2
    line = _error_line(capsys.readouterr().err, "search")
    assert f"the model recorded in {gallery / 'gallery.json'}, {moved}, is not there" in line


def test_list_images_leaves_hidden_files_and_thumbnail_folders_out(tmp_path):
    """macOS writes ._name.jpg side files on shared drives, NAS boxes @eaDir thumbnails: not
    the user's crops (they made sureid extract fail on the first one)."""
    from sureid.inference import list_images

    for name in ("p0.jpg", "._p0.jpg", ".hidden/p1.jpg", "@eaDir/p0.jpg/thumb.jpg", "sub/p2.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert list_images([tmp_path]) == [str(tmp_path / "p0.jpg"), str(tmp_path / "sub" / "p2.png")]
    assert list_images([tmp_path / "._p0.jpg"]) == [str(tmp_path / "._p0.jpg")]  # named: kept
