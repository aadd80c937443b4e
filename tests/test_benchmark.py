"""The throughput benchmark: FLOPs-bound arithmetic, the table's arithmetic on hand-made times,
the round-robin timer on a fake clock, and a smoke run on a tiny config (no assertions on measured
speed: speed is shown by docs/benchmarks.md, not by tests)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sureid import SureidStudentConfig, benchmark
from sureid.benchmark import (
    COLUMNS,
    TINY_PRESET,
    Candidate,
    add_arguments,
    block_macs,
    command_line,
    dense_macs,
    flops_bound,
    format_table,
    peak_cpu_mib,
    predictor_macs,
    resolve_device_and_dtype,
    rows_from_times,
    run_benchmark,
    student_macs,
    time_round_robin,
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
    # The bounds match docs/benchmarks.md's list (2.15x ... 1.17x), the paper's own.
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


def test_rows_from_hand_made_times():
    base = Candidate("base", "torch", lambda: None, macs=100, macs_as_run=100)
    row = Candidate("row", "torch", lambda: None, 0.5, "4>2", macs=50, macs_as_run=40)
    wall = {"base": [10.0, 20.0, 30.0, 40.0], "row": [5.0, 10.0, 20.0, 40.0]}
    cpu = {"base": [10.0, 10.0, 10.0, 10.0], "row": [5.0, 0.0, 5.0, 10.0]}
    got_base, got = rows_from_times([base, row], wall, cpu, batch_size=8, peak_mib={"row": 3.5})
    # per-round ratios 10/5, 20/10, 30/20, 40/40 = 2, 2, 1.5, 1: median (2 + 1.5) / 2
    assert (got.speedup, got.speedup_min, got.speedup_max) == (1.75, 1.0, 2.0)
    # an even count's median is the mean of the middle two: (10 + 20) / 2
    assert (got.median_ms, got.min_ms, got.max_ms) == (15.0, 5.0, 40.0)
    assert got.images_per_second == pytest.approx(8 / 0.015)
    # CPU-time ratios skip the round whose time is 0: 2, 2, 1 -> 2; CPU median (5 + 5) / 2
    assert (got.speedup_cpu, got.cpu_median_ms) == (2.0, 5.0)
    assert (got.flops_bound, got.flops_bound_as_run, got.gmacs_per_image) == (2.0, 2.5, 40e-9)
    assert (got.peak_mib, got_base.peak_mib) == (3.5, None)
    assert (got.keep_rate, got.tokens, got_base.speedup_min, got_base.flops_bound) == (
        0.5,
        "4>2",
        1.0,
        1.0,
    )


def test_round_robin_rotates_the_order_and_skips_warm_up(monkeypatch):
    clock = SimpleNamespace(wall=0.0, cpu=0.0)
    monkeypatch.setattr(
        benchmark,
        "time",
        SimpleNamespace(perf_counter=lambda: clock.wall, process_time=lambda: clock.cpu),
    )
    order: list[str] = []

    def row(name: str, first_ms: float):
        calls = iter(range(100))

        def call():  # the k-th call takes first_ms + k ms of wall time, half of it on the CPU
            ms = first_ms + next(calls)
            order.append(name)
            clock.wall += ms / 1000
            clock.cpu += ms / 2000

        return call

    said: list[str] = []
    wall, cpu = time_round_robin({"a": row("a", 1), "b": row("b", 3)}, 3, 1, log=said.append)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert wall["a"] == pytest.approx([2, 3, 4]) and wall["b"] == pytest.approx([4, 5, 6])
    assert cpu["a"] == pytest.approx([1, 1.5, 2]) and cpu["b"] == pytest.approx([2, 2.5, 3])
    assert said == [
        "round 1/4 (warm-up) done",
        "round 2/4 (timed) done",
        "round 3/4 (timed) done",
        "round 4/4 (timed) done",
    ]


def test_peak_cpu_memory_of_known_allocations():
    def two_mib_then_half():
        a = torch.ones(2**20, dtype=torch.uint8)
        b = torch.ones(2**20, dtype=torch.uint8)
        del a, b
        return torch.ones(2**19, dtype=torch.uint8)

    assert peak_cpu_mib(two_mib_then_half) == 2.0


def test_device_and_dtype_follow_the_inference_policy(monkeypatch):
    assert resolve_device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert resolve_device_and_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_device_and_dtype("cpu", "float8")
    with pytest.raises(ValueError, match="float16 on the CPU is not a fast path"):
        run_benchmark(device="cpu", dtype="float16", **TINY_PRESET)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_device_and_dtype("auto") == (torch.device("cuda"), expected)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device_and_dtype("auto") == (torch.device("mps"), torch.float32)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        resolve_device_and_dtype("cuda:0")


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
    # the tiny rows are named as what they are, not as DeiT-S and ViT-B
    assert names == [
        "tiny timm ViT (deit_small layout, hidden 64, dense)",
        "SUREID student, keep 1.0",
        "SUREID student, keep 0.5",
        "SUREID student, keep 0.7",
        "SUREID teacher, tiny ViT (vit_base layout, hidden 96, dense)",
    ]
    base, keep10, keep05 = report.rows[0], report.rows[1], report.rows[2]
    # TINY_PRESET: 32 image tokens + the class token, C = 64, H = 256 (teacher: C = 96, H = 384).
    # A full block on 33 tokens: 33 * (4*64*64 + 2*64*256) + 2 * 33*33 * 64 = 1_761_408;
    # the class token's row alone: 2*33*64*64 + 2*64*64 + 2*64*256 + 2*33*64 = 315_520.
    assert base.gmacs_per_image == pytest.approx(6 * 1_761_408 / 1e9)
    assert keep10.gmacs_per_image == pytest.approx((5 * 1_761_408 + 315_520) / 1e9)
    assert keep10.flops_bound == 1.0 and keep10.tokens == "32"
    assert keep05.tokens == "32>16>8>4"
    config = SureidStudentConfig(**TINY, sparsify_layers=(1, 3, 5), keep_rate=0.5)
    assert keep05.flops_bound == pytest.approx(flops_bound(config))
    assert keep05.flops_bound_as_run == pytest.approx(
        dense_macs(config) / student_macs(config, as_run=True)
    )
    assert keep10.flops_bound_as_run > 1.0  # its last block runs on the class token only
    teacher = report.rows[-1]
    # 33 * (4*96*96 + 2*96*384) + 2 * 33*33 * 96 = 3_858_624 per teacher block
    assert teacher.flops_bound == pytest.approx(1_761_408 / 3_858_624)
    assert all(r.peak_mib > 0 for r in report.rows)  # every row is a PyTorch row here
    for key in ("device", "torch", "timm", "transformers", "torch threads", "batch size"):
        assert key in report.environment
    assert report.environment["torch threads"].startswith("1 intra-op")
    table = format_table(report)
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(COLUMNS)
    assert sum(line.startswith("| SUREID") for line in table.splitlines()) == 4


def test_dense_rows_are_named_by_the_model_they_time():
    """The full-size rows keep the names docs/benchmarks.md quotes; a changed architecture
    says what changed (it is not the model the timm name stands for)."""
    assert benchmark._row_label("timm", "deit_small_patch16_224", None, None) == (
        "timm deit_small_patch16_224 (dense)"
    )
    teacher = benchmark._row_label("SUREID teacher", "vit_base_patch16_224", {}, None)
    assert teacher == "SUREID teacher vit_base_patch16_224 (dense)"
    changed = benchmark._row_label("timm", "deit_small_patch16_224", {"embed_dim": 64}, None)
    assert changed == "timm deit_small_patch16_224 with embed_dim 64 (dense)"
    assert benchmark._row_label("timm", "x", {"depth": 2}, "my row") == "my row"


@pytest.mark.slow
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
    # a --tiny run says above its tables that it is a smoke test, in the file too
    header = printed.split("### Batch 2")[0]
    assert "Smoke test (--tiny)" in header and "not a measurement" in header
    assert "not a measurement" in out.read_text().split("### Batch 2")[0]
    monkeypatch.setattr(sys, "argv", ["benchmarks/throughput.py", *args])
    with pytest.raises(SystemExit, match="^0$") as done:
        runpy.run_path(str(ROOT / "benchmarks" / "throughput.py"), run_name="__main__")
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Command: `python benchmarks/throughput.py --batch-size 2")
    assert "| tiny timm ViT (deit_small layout, hidden 64, dense) |" in printed
    assert "deit_small_patch16_224" not in printed.split("### Batch")[1]
    assert "Smoke test (--tiny)" in printed


def test_command_line_parses_back_to_the_same_options():
    parser = add_arguments(argparse.ArgumentParser())
    argv = ["--batch-size", "1", "32", "--keep-rates", "0.7", "--repeats", "3", "--warmup", "0"]
    argv += ["--device", "cpu", "--dtype", "bfloat16", "--threads", "2", "--compile"]
    argv += ["--cuda-graphs", "--onnx", "--onnx-keep-rates", "0.5", "--no-teacher", "--no-memory"]
    argv += ["--tiny", "--seed", "3", "--out", "t.md", "--quiet"]
    args = parser.parse_args(argv)
    assert command_line(args, "prog") == "prog " + " ".join(argv)
    assert command_line(parser.parse_args(["--no-onnx"]), "prog") == "prog --no-onnx"
    assert command_line(parser.parse_args([]), "prog") == "prog"


def test_bad_benchmark_arguments_name_the_value(capsys):
    assert main(["benchmark", "--tiny", "--keep-rates", "1.5", "--quiet"]) == 2
    assert "keep rates must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        run_benchmark(device="cpu", cuda_graphs=True, **TINY_PRESET)


def test_round_robin_times_each_turn_over_its_calls_per_round():
    """A short call is timed over several back-to-back calls a turn (the demo's speed column
    used single calls of a few milliseconds, at the mercy of the machine's noise)."""
    from sureid.benchmark import time_round_robin

    counted = {"a": 0, "b": 0}

    def call(name):
        counted[name] += 1

    wall, cpu = time_round_robin(
        {"a": lambda: call("a"), "b": lambda: call("b")},
        repeats=3,
        warmup=1,
        calls_per_round={"a": 5},
    )
    assert counted == {"a": 4 * 5, "b": 4 * 1}  # 1 warm-up round + 3 timed, 5 calls a turn
    assert len(wall["a"]) == len(wall["b"]) == len(cpu["a"]) == 3


def test_demo_speedups_are_taken_round_by_round():
    from sureid.demo import speedups

    times = {"dense": [10.0, 20.0, 10.0], "hts": [5.0, 10.0, 8.0]}  # a slow second round
    assert speedups(times, "dense") == {"dense": (1.0, 1.0, 1.0), "hts": (2.0, 1.25, 2.0)}
