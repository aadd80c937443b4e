"""The ``sureid`` console script: version, the demo's smoke run, argument and user errors."""

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

from sureid import (
    SureidError,
    SureidStudentConfig,
    SureidStudentModel,
    SureidTeacherConfig,
    SureidTeacherModel,
    __version__,
)
from sureid.cli import main

from .conftest import TINY


@pytest.mark.slow
def test_version_matches_the_package():
    done = subprocess.run(
        [sys.executable, "-m", "sureid.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == f"sureid {__version__}"


def test_version_in_process(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sureid {__version__}"


def test_demo_options_parse_and_retired_ones_are_refused(capsys):
    from sureid.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--out", "d", "--hts-epochs", "2"])
    assert (args.command, args.quick, args.out, args.hts_epochs) == ("demo", True, "d", 2.0)
    assert args.backbone is None and args.student_epochs is None
    with pytest.raises(SystemExit, match="^2$"):
        build_parser().parse_args(["demo", "--token-guidance", "cls-attention"])
    assert "unrecognized arguments: --token-guidance" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_runs_every_step(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "| model | keep |"):
        assert step in printed
    report = (out / "report.md").read_text()
    for row in ("dense", "+ HTS |", "+ HTS + NPKD |", "+ HTS + NPKD + NODA (SUREID)", "teacher"):
        assert row in report
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 5
    assert all(0.0 <= r["rank1"] <= 1.0 and r["images_per_second"] > 0 for r in rows)
    # 32 tokens at 64x32 / patch 8; p = 0.7 keeps 22, 16, 11
    assert [r["tokens_last_stage"] for r in rows] == [32, 11, 11, 11, 32]
    assert (out / "kept_tokens.png").stat().st_size > 0
    assert (out / "hts_npkd_noda" / "model.safetensors").is_file()


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(["no-such-command"])
    assert (
        main(["convert", "--timm-name", "nope_model", "--checkpoint", "missing.pth", "--out", "x"])
        == 2
    )
    assert "nope_model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# User errors: one line, exit status 2, no traceback (--debug / SUREID_DEBUG=1 show it)
# --------------------------------------------------------------------------------------------


def _console(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``sureid`` console script (as a user would) offline."""
    script = Path(sys.executable).with_name("sureid")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "sureid.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600
    )


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"sureid {command}: error:")]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student")
    SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    good = folder / "person.png"
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(good)
    bad = folder / "truncated.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    return {"good": good, "bad": bad, "missing": folder / "missing.jpg"}


def _tiny_synthetic(root: Path) -> Path:
    from sureid.data import make_synthetic_reid

    return make_synthetic_reid(
        root, num_train_ids=2, num_test_ids=2, size=(64, 32), images_per_train_id=2,
        queries_per_id=1, gallery_per_id=2, num_cameras=2,
    )  # fmt: skip


@pytest.mark.slow
def test_evaluate_on_a_nan_checkpoint_fails_instead_of_printing_numbers(tmp_path):
    """Case: an all-NaN checkpoint printed R1 25.0 / mAP 41.8 and exited 0."""
    model = SureidStudentModel(SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5)))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(tmp_path / "diverged")
    root = _tiny_synthetic(tmp_path / "data")
    done = _console(
        "evaluate", "--model", tmp_path / "diverged", "--dataset", "synthetic", "--root", root,
        "--device", "cpu",
    )  # fmt: skip
    line = _one_error_line(done.stderr, "evaluate")
    assert done.returncode == 2 and "R1" not in done.stdout
    assert "NaN/inf embedding" in line and "weights are not finite" in line


@pytest.mark.slow
def test_extract_with_every_input_unreadable_saves_nothing_and_fails(student_dir, crops, tmp_path):
    """Case: --skip-errors with every input bad exited 0 with an empty gallery."""
    out = tmp_path / "gallery"
    done = _console(
        "extract", "--model", student_dir, "--images", crops["bad"], crops["missing"],
        "--out", out, "--skip-errors", "--device", "cpu",
    )  # fmt: skip
    line = _one_error_line(done.stderr, "extract")
    assert done.returncode == 2 and "none of the 2 inputs gave an embedding" in line
    assert f"skipped input 0 ({crops['bad']})" in done.stderr and not out.exists()


def test_load_errors_are_one_line_and_debug_shows_the_traceback(
    student_dir, crops, tmp_path, capsys, monkeypatch
):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(student_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)  # an interrupted download
    extract = ["extract", "--model", str(corrupt), "--images", str(crops["good"])]
    extract += ["--out", str(tmp_path / "g"), "--device", "cpu"]
    assert main(extract) == 2
    line = _one_error_line(capsys.readouterr().err, "extract")
    assert f"not a valid safetensors file: {corrupt / 'model.safetensors'}" in line
    missing = tmp_path / "no-such-model"
    assert main(["export-onnx", "--model", str(missing), "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"no such checkpoint folder: {missing}" in _one_error_line(
        capsys.readouterr().err, "export-onnx"
    )
    with pytest.raises(SureidError, match="not a valid safetensors file"):
        main([*extract, "--debug"])
    monkeypatch.setenv("SUREID_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        main(["export-onnx", "--model", str(missing), "--out", str(tmp_path / "m.onnx")])


def test_evaluate_skip_errors_and_a_json_report_without_nan(student_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    for split, pid, name in (("query", 2, "q_c1.png"), ("gallery", 1, "g_c2.png")):
        (tmp_path / split / str(pid)).mkdir(parents=True)
        image = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / split / str(pid) / name)
    (tmp_path / "gallery" / "3").mkdir()
    (tmp_path / "gallery" / "3" / "bad_c2.png").write_bytes(b"not an image")
    command = ["evaluate", "--model", str(student_dir), "--dataset", "folder", "--root"]
    command += [str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "eval.json")]
    assert main(command) == 2
    line = _one_error_line(capsys.readouterr().err, "evaluate")
    assert "bad_c2.png" in line and "--skip-errors" in line and "on_error" not in line
    assert main([*command, "--skip-errors"]) == 0
    assert "skipped gallery input 1" in capsys.readouterr().err

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "eval.json").read_text(), parse_constant=refuse)
    # the one query has no match in the gallery: no numbers, and null rather than NaN
    assert report["mAP"] is None and report["R1"] is None and report["num_no_match"] == 1
    assert [s["source"] for s in report["skipped"]["gallery"]] == [
        str(tmp_path / "gallery" / "3" / "bad_c2.png")
    ]


def test_extract_a_split_reads_only_that_split(student_dir, tmp_path, capsys):
    (tmp_path / "gallery" / "4").mkdir(parents=True)
    Image.new("RGB", (32, 64), (200, 10, 10)).save(tmp_path / "gallery" / "4" / "g.png")
    (tmp_path / "query").mkdir()
    Image.new("RGB", (32, 64)).save(tmp_path / "query" / "stray.png")  # not in a pid folder
    command = ["extract", "--model", str(student_dir), "--dataset", "folder", "--root"]
    command += [str(tmp_path), "--split", "gallery", "--out", str(tmp_path / "out")]
    assert main([*command, "--device", "cpu"]) == 0
    assert "saved 1 embeddings" in capsys.readouterr().out


def test_train_checks_the_teacher_before_reading_any_data(tmp_path, capsys):
    data_root = tmp_path / "synthetic"  # would be generated if the run got that far
    command = ["train", "student", "--dataset", "synthetic", "--data-root", str(data_root)]
    command += ["--output-dir", str(tmp_path / "out"), "--from-scratch"]
    missing = tmp_path / "no-teacher"
    assert main([*command, "--teacher", str(missing)]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"--teacher {missing}: no such checkpoint folder" in line
    teacher = tmp_path / "teacher"
    SureidTeacherModel(SureidTeacherConfig(**TINY)).save_pretrained(teacher)  # 64x32
    assert main([*command, "--teacher", str(teacher)]) == 2  # the run: 256x128
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"--teacher {teacher} was trained at image size 64x32 but this run uses 256x128" in line
    assert "--image-size 64 32" in line and not data_root.exists()


@pytest.mark.slow
def test_offline_without_weights_names_the_options(tmp_path, capsys, monkeypatch):
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    create_model = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise LocalEntryNotFoundError("cannot reach the Hugging Face Hub")
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    root = _tiny_synthetic(tmp_path / "data")
    command = ["train", "teacher", "--dataset", "synthetic", "--data-root", str(root)]
    command += ["--output-dir", str(tmp_path / "out"), "--timm-model", "deit_tiny_patch16_224"]
    assert main([*command, "--image-size", "64", "32"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "'deit_tiny_patch16_224'" in line and "cannot reach the Hugging Face Hub" in line
    assert "--imagenet-checkpoint FILE" in line and "--from-scratch" in line
    convert = ["convert", "--timm-name", "deit_tiny_patch16_224", "--out", str(tmp_path / "c")]
    assert main(convert) == 2
    assert "--checkpoint FILE" in _one_error_line(capsys.readouterr().err, "convert")


@pytest.mark.slow
def test_version_help_and_zoo_load_neither_torch_nor_transformers(run_offline_python, tmp_path):
    """They took about 6 s on 2 cores when every command imported torch, transformers and timm
    first; now only the commands that need them do (timings: the issue's note)."""
    script = (
        "import contextlib, io, json, sys\n"
        "from sureid.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    for argv in (['--version'], ['--help'], ['zoo'], ['zoo', 'show', 'demo-sureid'],\n"
        "                 ['train', '--help'], ['demo', '--help']):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'timm', 'torchvision', 'datasets')\n"
        "               if m in sys.modules)\n"
        "print(json.dumps([heavy, 'sureid-deit-occduke' in out.getvalue()]))\n"
    )
    assert run_offline_python(script, tmp_path / "hf") == [[], True]
