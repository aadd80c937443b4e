"""The throughput benchmark: FLOPs-bound arithmetic, and a smoke run on a tiny config (no timing
assertions: speed is shown by docs/benchmarks.md, not by tests)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from sureid import SureidStudentConfig
from sureid.benchmark import (
    COLUMNS,
    TINY_PRESET,
    block_macs,
    dense_macs,
    flops_bound,
    format_table,
    predictor_macs,
    run_benchmark,
    student_macs,
)
from sureid.cli import main

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_block_macs_by_hand():
    # C = 4, H = 16: one block on 3 tokens = 3 * (4*16 + 2*4*16) + 2 * 9 * 4 = 3 * 192 + 72 = 648
    assert block_macs([3], hidden_size=4, mlp_ratio=4.0) == 648
    assert block_macs([3, 2], hidden_size=4) == 648 + 2 * 192 + 2 * 4 * 4


def test_flops_bound_of_the_default_schedule_by_hand():
    # DeiT-S at 256x128, patch 16: 128 image tokens + class token, C = 384, H = 1536.
    # p = 0.7 keeps 90, 63, 44 -> blocks see 129 (x3), 91 (x3), 64 (x3), 45 (x3) tokens.
    c, h = 384, 1536

    def block(n):
        return n * (4 * c * c + 2 * c * h) + 2 * n * n * c

    dense = 12 * block(129)
    sparse = 3 * (block(129) + block(91) + block(64) + block(45))
    config = SureidStudentConfig(keep_rate=0.7)
    assert config.tokens_per_block() == [129] * 3 + [91] * 3 + [64] * 3 + [45] * 3
    assert dense == 12 * 241_042_176  # 129 * 1_769_472 + 2 * 129**2 * 384 per block
    assert dense_macs(config) == dense
    assert student_macs(config) == sparse
    assert flops_bound(config) == pytest.approx(dense / sparse)
    # The bounds match PAPER.md's list (2.15x ... 1.17x).
    bounds = [round(flops_bound(SureidStudentConfig(keep_rate=p)), 2) for p in (0.5, 0.6, 0.7)]
    assert bounds == [2.15, 1.85, 1.59]
    bounds = [round(flops_bound(SureidStudentConfig(keep_rate=p)), 2) for p in (0.8, 0.9)]
    assert bounds == [1.37, 1.17]


def test_class_token_only_last_block_macs_by_hand():
    # C = 4, H = 16, last block on n = 2 tokens, class token's row only:
    # keys and values 2 * 2 * 16 = 64, query 16, projection 16, MLP 2 * 4 * 16 = 128,
    # one attention row 2 * 2 * 4 = 16 -> 240 (the full block on 2 tokens: 448 + 32 = 480).
    assert block_macs([2], hidden_size=4, cls_only_last=True) == 240
    assert block_macs([3, 2], hidden_size=4, cls_only_last=True) == 648 + 240
    # As the models run: DeiT-S at keep 0.7 adds the predictors and trims the last block.
    config = SureidStudentConfig(keep_rate=0.7)
    c, h, n = 384, 1536, 45
    last_full = n * (4 * c * c + 2 * c * h) + 2 * n * n * c
    last_cls = 2 * n * c * c + 2 * c * c + 2 * c * h + 2 * n * c
    assert student_macs(config, as_run=True) == (
        student_macs(config) - last_full + last_cls + predictor_macs(config)
    )
    assert dense_macs(config, as_run=True) < dense_macs(config)


def test_predictor_macs_by_hand():
    # C = 64: per token 64*64 + 32*32 + 32*16 + 16 = 5648, per image 32*32 = 1024.
    # 32 image tokens, p = 0.5 keeps 16, 8, 4: the stages score 32, 16 and 8 tokens.
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.5)
    assert config.stage_keep_counts == [16, 8, 4]
    assert predictor_macs(config) == (32 + 16 + 8) * 5648 + 3 * 1024
    assert predictor_macs(SureidStudentConfig(**TINY, sparsify_layers=(1,), keep_rate=1.0)) == 0


def test_tiny_benchmark_has_every_row_and_column():
    report = run_benchmark(
        batch_size=2,
        keep_rates=(0.5, 0.7),
        repeats=2,
        warmup=0,
        threads=1,
        onnx=False,
        **TINY_PRESET,
    )
    names = [r.name for r in report.rows]
    assert names == [
        "timm deit_small_patch16_224 (dense)",
        "SUREID student, keep 1.0",
        "SUREID student, keep 0.5",
        "SUREID student, keep 0.7",
        "SUREID teacher vit_base_patch16_224 (dense)",
    ]
    base, keep10, keep05 = report.rows[0], report.rows[1], report.rows[2]
    assert base.speedup == 1.0 and base.flops_bound == 1.0
    assert keep10.flops_bound == 1.0 and keep10.tokens == "32"
    assert keep05.tokens == "32>16>8>4"
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.5)
    assert keep05.flops_bound == pytest.approx(flops_bound(config))
    assert keep05.flops_bound_as_run == pytest.approx(
        dense_macs(config) / student_macs(config, as_run=True)
    )
    assert keep10.flops_bound_as_run > 1.0  # its last block runs on the class token only
    teacher = report.rows[-1]
    assert teacher.flops_bound < 1.0  # ViT-B costs more than the DeiT-S-shaped baseline
    for r in report.rows:
        assert r.median_ms > 0 and r.min_ms <= r.median_ms <= r.max_ms
        assert r.images_per_second > 0 and r.speedup > 0
        assert r.peak_mib is None or r.peak_mib > 0
    for key in ("device", "torch", "timm", "transformers", "torch threads", "batch size"):
        assert key in report.environment
    assert report.environment["torch threads"].startswith("1 intra-op")
    table = format_table(report)
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(COLUMNS)
    assert sum(line.startswith("| SUREID") for line in table.splitlines()) == 4


def test_onnxruntime_rows_when_available():
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (the 'onnx' extra)")
    report = run_benchmark(
        batch_size=2,
        keep_rates=(0.5,),
        repeats=1,
        warmup=0,
        threads=1,
        onnx=True,
        onnx_keep_rates=(0.5,),
        teacher=False,
        memory=False,
        **TINY_PRESET,
    )
    row = report.row("SUREID student, keep 0.5 (onnxruntime)")
    assert row.backend == "onnxruntime" and row.tokens == "32>16>8>4" and row.peak_mib is None


def test_cli_and_script_print_the_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "table.md"
    args = ["--tiny", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    args += ["--keep-rates", "0.7", "--no-onnx", "--no-teacher", "--no-memory", "--quiet"]
    assert main(["benchmark", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Command: `sureid benchmark --batch-size 2 --keep-rates 0.7")
    assert "| SUREID student, keep 0.7 |" in printed and "### Batch 2" in printed
    assert "| SUREID student, keep 0.7 |" in out.read_text()
    monkeypatch.setattr(sys, "argv", ["benchmarks/throughput.py", *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "benchmarks" / "throughput.py"), run_name="__main__")
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Command: `python benchmarks/throughput.py --batch-size 2")
    assert "| timm deit_small_patch16_224 (dense) |" in printed


def test_bad_benchmark_arguments_name_the_value(capsys):
    assert main(["benchmark", "--tiny", "--keep-rates", "1.5", "--quiet"]) == 2
    assert "keep rates must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        run_benchmark(device="cpu", cuda_graphs=True, **TINY_PRESET)
