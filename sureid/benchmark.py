"""Throughput / latency / memory of SUREID models beside the dense models they come from.

One run measures every row side by side: timm's dense DeiT-S (the baseline), the student at keep
1.0 and at each keep rate (same weights), the dense ViT-B teacher, and, when onnxruntime is
importable, exported students on onnxruntime (CPU). Rows are timed round-robin (one call of each
row per round, the order rotated every round, after warm-up rounds), so a slow spell of a shared
machine hits every row alike; each row's speed-up over the baseline is the median of its
per-round ratios.

The FLOPs bound of a keep schedule comes from the token counts alone. A block on ``n`` tokens
(prefix included) with width ``C`` and MLP width ``H`` costs ``n (4 C^2 + 2 C H) + 2 n^2 C``
multiply-adds (qkv 3nC^2, projection nC^2, MLP 2nCH, QK^T and AV n^2 C each); the bound is the
baseline's block multiply-adds over the row's (the paper's count: every block on all its tokens).
``flops_bound_as_run`` divides by what the row really executes instead: the TokenPredictors' cost
at inference added (``predictor_macs``) and the last block computed for the class token's row only
(``Block(..., cls_only=True)``: keys and values of every token, one query, one token through the
projection and MLP), which SUREID models do and timm's dense model does not.

``time_forward`` is the small helper ``sureid demo`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .configuration_sureid import SureidConfig, SureidError, SureidStudentConfig

DEFAULT_KEEP_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_ONNX_KEEP_RATES = (1.0, 0.7, 0.5)
BASELINE_TIMM = "deit_small_patch16_224"
TEACHER_TIMM = "vit_base_patch16_224"

# A tiny architecture for smoke tests (hidden 64, depth 6, 64x32 images, patch 8 -> 32 tokens).
TINY_PRESET = {
    "image_size": (64, 32),
    "timm_overrides": {"patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 4},
    "teacher_overrides": {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 4},
    "student_overrides": {"sparsify_layers": (1, 3, 5)},
}


# --------------------------------------------------------------------------------------------
# The small helper (used by `sureid demo`)
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Milliseconds per batch over ``repeats`` runs, and the batch size they were measured at."""

    batch_size: int
    median_ms: float
    min_ms: float
    max_ms: float

    @property
    def images_per_second(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)


def time_forward(
    model: nn.Module, pixel_values: torch.Tensor, repeats: int = 5, warmup: int = 2
) -> Timing:
    """Time ``model(pixel_values)`` in eval mode; synchronises CUDA around each run."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model.eval()
    sync = torch.cuda.synchronize if pixel_values.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(pixel_values)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return Timing(pixel_values.shape[0], statistics.median(times), min(times), max(times))


# --------------------------------------------------------------------------------------------
# FLOPs from token counts
# --------------------------------------------------------------------------------------------


def block_macs(
    tokens_per_block: Sequence[int],
    hidden_size: int,
    mlp_ratio: float = 4.0,
    cls_only_last: bool = False,
) -> int:
    """Multiply-adds of transformer blocks on the given token counts (prefix tokens included).

    Per block on ``n`` tokens: ``n (4 C^2 + 2 C H) + 2 n^2 C`` with ``H = int(C * mlp_ratio)``:
    the linear layers plus attention's quadratic QK^T and AV. Norms, softmax and GELU are left out.
    ``cls_only_last``: the last block computes the class token's row alone, ``2 n C^2`` (keys,
    values) ``+ 2 C^2 + 2 C H`` (one query, projection and MLP) ``+ 2 n C`` (one attention row).
    """
    c = int(hidden_size)
    h = int(c * mlp_ratio)
    counts = list(tokens_per_block)
    total = sum(n * (4 * c * c + 2 * c * h) + 2 * n * n * c for n in counts)
    if cls_only_last and counts:
        n = counts[-1]
        total -= n * (4 * c * c + 2 * c * h) + 2 * n * n * c
        total += 2 * n * c * c + 2 * c * c + 2 * c * h + 2 * n * c
    return total


def predictor_macs(config: SureidStudentConfig) -> int:
    """Multiply-adds of the TokenPredictors at inference (``TokenPredictor.keep_score``).

    Stage j scores the ``n`` image tokens present before it: per token ``C^2`` (in_conv) +
    ``(C/2)^2`` (first out_conv layer, local half) + ``(C/2)(C/4)`` + ``C/4`` (the keep-minus-drop
    row); per image ``(C/2)^2`` (the global half, computed once).
    """
    if not config.hts_enabled:
        return 0
    c = config.hidden_size
    per_token = c * c + (c // 2) ** 2 + (c // 2) * (c // 4) + c // 4
    total, current = 0, config.num_patches
    for count in config.stage_keep_counts:
        total += current * per_token + (c // 2) ** 2
        current = count
    return total


def student_macs(config: SureidStudentConfig, as_run: bool = False) -> int:
    """Block multiply-adds per image of a student at inference (its keep schedule).

    ``as_run`` False: the paper's count (every block on all its tokens); True: what the student
    executes (the predictors added, the last block on the class token's row).
    """
    macs = block_macs(
        config.tokens_per_block(), config.hidden_size, config.mlp_ratio, cls_only_last=as_run
    )
    return macs + (predictor_macs(config) if as_run else 0)


def dense_macs(config: SureidConfig, as_run: bool = False) -> int:
    """Block multiply-adds per image of the dense model with ``config``'s encoder.

    ``as_run`` True: as a SUREID model runs it (the last block on the class token's row).
    """
    n = config.num_patches + config.num_prefix_tokens
    return block_macs(
        [n] * config.num_hidden_layers, config.hidden_size, config.mlp_ratio, cls_only_last=as_run
    )


def flops_bound(config: SureidStudentConfig) -> float:
    """Speed-up the keep schedule allows from block FLOPs alone: dense MACs / schedule MACs."""
    return dense_macs(config) / student_macs(config)


def format_tokens(config: SureidConfig) -> str:
    """Image tokens per stretch of blocks, e.g. ``128>90>63>44`` (a dense model: ``128``)."""
    if not isinstance(config, SureidStudentConfig) or not config.hts_enabled:
        return str(config.num_patches)
    return ">".join(str(n) for n in [config.num_patches, *config.stage_keep_counts])


# --------------------------------------------------------------------------------------------
# Rows and their measurement
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkRow:
    """One measured row of the table (times in milliseconds per batch)."""

    name: str
    backend: str
    keep_rate: float | None
    tokens: str
    batch_size: int
    median_ms: float
    min_ms: float
    max_ms: float
    cpu_median_ms: float
    speedup: float
    speedup_min: float
    speedup_max: float
    speedup_cpu: float
    flops_bound: float | None
    flops_bound_as_run: float | None
    gmacs_per_image: float | None
    peak_mib: float | None

    @property
    def images_per_second(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)


@dataclass
class BenchmarkReport:
    """Rows of one run (one batch size) and the environment they were measured in."""

    rows: list[BenchmarkRow]
    environment: dict[str, str] = field(default_factory=dict)

    def row(self, name: str) -> BenchmarkRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")


@dataclass
class _Candidate:
    """A row before measurement: a zero-argument call plus what the table says about it."""

    name: str
    backend: str
    call: Callable[[], object]
    keep_rate: float | None = None
    tokens: str = ""
    macs: int | None = None
    macs_as_run: int | None = None
    memory: Callable[[], float | None] | None = None


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SureidError(
            f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise SureidError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None`` picks float16 on a GPU and float32 on the CPU."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise SureidError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines), restoring it after."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): leave it alone
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_cpu_mib(call: Callable[[], object]) -> float | None:
    """Peak bytes the PyTorch CPU allocator held during ``call`` beyond what it held before.

    Read from the profiler's allocation events (no tracemalloc); ``None`` where this torch build
    does not expose them.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            call()
        nodes = list(prof.profiler.kineto_results.experimental_event_tree())
        allocations = []
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
                allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    except Exception:  # private profiler API: report "n/a" rather than guess
        return None
    current = peak = 0
    for _, size in sorted(allocations):
        current += size
        peak = max(peak, current)
    return peak / 2**20


def _peak_cuda_mib(call: Callable[[], object], device: torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` during ``call``, beyond what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _cuda_graph(model: nn.Module, pixels: torch.Tensor) -> Callable[[], object]:
    """Capture one forward of ``model`` on ``pixels`` as a CUDA graph; the call replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(pixels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(pixels)
    return graph.replay


def _timm_vit(name: str, image_size: Sequence[int], overrides: dict) -> nn.Module:
    """A randomly initialised timm ViT at ``image_size`` (never downloads weights)."""
    import timm

    try:
        model = timm.create_model(
            name, pretrained=False, img_size=tuple(image_size), num_classes=0, **overrides
        )
    except RuntimeError as err:
        raise SureidError(f"timm cannot build {name!r} ({err}); pass a timm ViT/DeiT name") from err
    return model.eval()


def _sureid_from_timm(cls, timm_model: nn.Module, name: str, image_size, **fields) -> nn.Module:
    """A SUREID model with ``timm_model``'s architecture and weights."""
    from .convert import _architecture, load_timm_state_dict

    arch = _architecture(timm_model, name)
    arch.update(image_size=tuple(image_size), drop_path_rate=0.0, **fields)
    model = cls(cls.config_class(**arch))
    load_timm_state_dict(model, name, checkpoint=timm_model)
    return model.eval()


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Device, threads and library versions, as printed above the table."""
    from . import __version__

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("timm", "transformers", "onnxruntime"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    env["sureid"] = __version__
    if device.type == "cuda":
        env["device"] = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        env["device"] = (
            f"CPU {cpu}, {os.cpu_count()} logical cores, "
            f"ISA {torch.backends.cpu.get_cpu_capability()}"
        )
    env["torch threads"] = (
        f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    )
    env["dtype"] = str(dtype).removeprefix("torch.")
    return env


def run_benchmark(
    batch_size: int = 32,
    keep_rates: Sequence[float] = DEFAULT_KEEP_RATES,
    repeats: int = 10,
    warmup: int = 2,
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    onnx: bool | None = None,
    onnx_keep_rates: Sequence[float] = DEFAULT_ONNX_KEEP_RATES,
    teacher: bool = True,
    memory: bool = True,
    timm_name: str = BASELINE_TIMM,
    teacher_timm_name: str = TEACHER_TIMM,
    image_size: Sequence[int] = (256, 128),
    timm_overrides: dict | None = None,
    teacher_overrides: dict | None = None,
    student_overrides: dict | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BenchmarkReport:
    """Build every row, time them round-robin and return the table's rows.

    ``onnx`` None adds onnxruntime rows when onnxruntime is importable (CPU only).
    ``compile`` wraps the PyTorch rows in ``torch.compile``; ``cuda_graphs`` (GPU only) replays
    each PyTorch row from a captured CUDA graph. ``*_overrides`` change the architecture (timm
    keyword arguments for the baseline and teacher, config fields for the students): the smoke
    test uses ``TINY_PRESET``. Weights are random (timm, ``pretrained=False``): speed does not
    depend on them, and the students share the baseline's weights.
    """
    say = log or (lambda _msg: None)
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise SureidError(
            f"need batch_size >= 1, repeats >= 1, warmup >= 0; got batch_size={batch_size}, "
            f"repeats={repeats}, warmup={warmup}"
        )
    for rate in (*keep_rates, *onnx_keep_rates):
        if not 0.0 < rate <= 1.0:
            raise SureidError(f"keep rates must be in (0, 1], got {rate}")
    dev = _device(device)
    dt = _dtype(dtype, dev)
    if cuda_graphs and dev.type != "cuda":
        raise SureidError(
            "cuda_graphs needs a CUDA device; drop --cuda-graphs or use --device cuda"
        )
    if dev.type == "cpu" and dt == torch.float16:
        raise SureidError(
            "float16 on the CPU is not a fast path in PyTorch; use float32 or bfloat16"
        )
    if threads:
        torch.set_num_threads(threads)
    if onnx is None:
        onnx = dev.type == "cpu" and dt == torch.float32 and _onnxruntime_available()
    elif onnx and not _onnxruntime_available():
        raise SureidError(
            "onnxruntime rows asked for but onnxruntime is not installed: pip install 'sureid[onnx]'"
        )
    elif onnx and (dev.type != "cpu" or dt != torch.float32):
        raise SureidError("onnxruntime rows are measured on the CPU in float32 only; drop --onnx")

    from .modeling_sureid import SureidStudentModel, SureidTeacherModel

    torch.manual_seed(seed)
    student_fields = dict(student_overrides or {})
    base_timm = _timm_vit(timm_name, image_size, dict(timm_overrides or {}))
    say(f"building students from {timm_name} (random weights)")
    dense_student = _sureid_from_timm(
        SureidStudentModel, base_timm, timm_name, image_size, keep_rate=1.0, **student_fields
    )
    ref_config = dense_student.config
    base_macs = dense_macs(ref_config)
    students = {}
    shared_predictors = None
    for rate in sorted({1.0, *keep_rates, *(onnx_keep_rates if onnx else ())}, reverse=True):
        if rate == 1.0:
            students[rate] = dense_student
            continue
        model = _sureid_from_timm(
            SureidStudentModel, base_timm, timm_name, image_size, keep_rate=rate, **student_fields
        )
        if shared_predictors is None:
            shared_predictors = model.predictors.state_dict()
        else:
            model.predictors.load_state_dict(shared_predictors)  # same weights in every row
        students[rate] = model

    pixels = torch.randn(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    pixels_dev = pixels.to(dev, dt)
    sync = _synchronizer(dev)

    def torch_call(model: nn.Module) -> tuple[Callable[[], object], Callable[[], float | None]]:
        model = model.to(dev, dt).eval()
        run_model = torch.compile(model) if compile else model
        if cuda_graphs:
            with torch.inference_mode():
                replay = _cuda_graph(run_model, pixels_dev)

            def call():
                replay()

            return call, lambda: None  # graph memory lives in its private pool

        def call():
            with torch.inference_mode():
                return run_model(pixels_dev)

        if not memory:
            return call, lambda: None
        if dev.type == "cuda":
            return call, lambda: _peak_cuda_mib(call, dev)
        return call, lambda: _peak_cpu_mib(call)

    candidates: list[_Candidate] = []
    call, mem = torch_call(base_timm)
    candidates.append(
        _Candidate(
            f"timm {timm_name} (dense)",
            "torch",
            call,
            None,
            format_tokens(ref_config),
            base_macs,
            base_macs,
            mem,
        )
    )
    for rate in [1.0, *sorted(set(keep_rates) - {1.0})]:
        model = students[rate]
        call, mem = torch_call(model)
        cfg = model.config
        candidates.append(
            _Candidate(
                f"SUREID student, keep {float(rate)}",
                "torch",
                call,
                rate,
                format_tokens(cfg),
                student_macs(cfg),
                student_macs(cfg, as_run=True),
                mem,
            )
        )
    if teacher:
        say(f"building the teacher from {teacher_timm_name} (random weights)")
        teacher_timm = _timm_vit(teacher_timm_name, image_size, dict(teacher_overrides or {}))
        teacher_model = _sureid_from_timm(
            SureidTeacherModel, teacher_timm, teacher_timm_name, image_size
        )
        del teacher_timm
        call, mem = torch_call(teacher_model)
        t_macs = dense_macs(teacher_model.config)
        candidates.append(
            _Candidate(
                f"SUREID teacher {teacher_timm_name} (dense)",
                "torch",
                call,
                None,
                format_tokens(teacher_model.config),
                t_macs,
                dense_macs(teacher_model.config, as_run=True),
                mem,
            )
        )
    tmpdir = None
    if onnx:
        from .export import export_onnx, onnx_session

        tmpdir = tempfile.TemporaryDirectory(prefix="sureid-bench-")
        feed = {"pixel_values": pixels.numpy()}
        for rate in sorted(set(onnx_keep_rates), reverse=True):
            model = students[rate]
            say(f"exporting the keep {float(rate)} student to ONNX")
            path = export_onnx(model, Path(tmpdir.name) / f"student_{rate:g}.onnx")
            session = onnx_session(path, threads=torch.get_num_threads())
            cfg = model.config
            candidates.append(
                _Candidate(
                    f"SUREID student, keep {float(rate)} (onnxruntime)",
                    "onnxruntime",
                    lambda s=session: s.run(["embeddings"], feed),
                    rate,
                    format_tokens(cfg),
                    student_macs(cfg),
                    student_macs(cfg, as_run=True),
                    None,
                )
            )
    env = environment(dev, dt)
    env.update(
        {
            "batch size": str(batch_size),
            "image size": f"{image_size[0]}x{image_size[1]}",
            "rounds": f"{warmup} warm-up + {repeats} timed, round-robin over the rows",
            "torch.compile": "on" if compile else "off",
            "CUDA graphs": "on" if cuda_graphs else "off",
            "load average (1/5/15 min) at start": _loadavg(),
        }
    )
    try:
        rows = _measure(candidates, batch_size, repeats, warmup, sync, say)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    env["load average (1/5/15 min) at end"] = _loadavg()
    return BenchmarkReport(rows=rows, environment=env)


def _loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _measure(
    candidates: list[_Candidate],
    batch_size: int,
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
    say: Callable[[str], None],
) -> list[BenchmarkRow]:
    """Round-robin timing (wall and process CPU time), then one memory pass per row.

    Each round calls every row once, starting one row later than the round before; a row's
    speed-up is the median over rounds of (baseline time / row time) within the round.
    """
    wall: dict[str, list[float]] = {c.name: [] for c in candidates}
    cpu: dict[str, list[float]] = {c.name: [] for c in candidates}
    for r in range(warmup + repeats):
        # Rotate the order each round so no row always follows the same neighbour.
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            c.call()
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                wall[c.name].append((t1 - t0) * 1000.0)
                cpu[c.name].append((c1 - c0) * 1000.0)
        kind = "warm-up" if r < warmup else "timed"
        say(f"round {r + 1}/{warmup + repeats} ({kind}) done")
    base = candidates[0]
    rows = []
    for c in candidates:
        ratios = [b / t for b, t in zip(wall[base.name], wall[c.name])]
        cpu_ratios = [b / t for b, t in zip(cpu[base.name], cpu[c.name]) if t > 0]
        peak = c.memory() if c.memory is not None else None
        rows.append(
            BenchmarkRow(
                name=c.name,
                backend=c.backend,
                keep_rate=c.keep_rate,
                tokens=c.tokens,
                batch_size=batch_size,
                median_ms=statistics.median(wall[c.name]),
                min_ms=min(wall[c.name]),
                max_ms=max(wall[c.name]),
                cpu_median_ms=statistics.median(cpu[c.name]),
                speedup=statistics.median(ratios),
                speedup_min=min(ratios),
                speedup_max=max(ratios),
                speedup_cpu=statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
                flops_bound=base.macs / c.macs if c.macs else None,
                flops_bound_as_run=base.macs / c.macs_as_run if c.macs_as_run else None,
                gmacs_per_image=c.macs_as_run / 1e9 if c.macs_as_run else None,
                peak_mib=peak,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

COLUMNS = (
    "model",
    "image tokens",
    "ms/batch (median)",
    "min-max",
    "img/s",
    "speed-up (wall)",
    "speed-up range",
    "speed-up (CPU time)",
    "FLOPs bound",
    "bound as run",
    "block GMACs/img (as run)",
    "peak MiB",
)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: BenchmarkReport) -> str:
    """The report as markdown: the environment as a list, then the table."""
    lines = [f"- {key}: {value}" for key, value in report.environment.items()]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report.rows:
        cells = [
            r.name,
            r.tokens,
            f"{r.median_ms:.1f}",
            f"{r.min_ms:.1f}-{r.max_ms:.1f}",
            f"{r.images_per_second:.1f}",
            f"{r.speedup:.2f}x",
            f"{r.speedup_min:.2f}-{r.speedup_max:.2f}",
            f"{r.speedup_cpu:.2f}x",
            _fmt(r.flops_bound, ".2f") + ("x" if r.flops_bound else ""),
            _fmt(r.flops_bound_as_run, ".2f") + ("x" if r.flops_bound_as_run else ""),
            _fmt(r.gmacs_per_image, ".3f"),
            _fmt(r.peak_mib, ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line (shared by `sureid benchmark` and benchmarks/throughput.py)
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, added to ``parser``."""
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one table each")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=list(DEFAULT_KEEP_RATES))
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda[:N]")
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="weights and inputs cast to it; default float16 on a GPU, float32 on the CPU",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument(
        "--compile", action="store_true", help="wrap the PyTorch rows in torch.compile"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="GPU: replay captured CUDA graphs"
    )
    onnx = parser.add_mutually_exclusive_group()
    onnx.add_argument(
        "--onnx", dest="onnx", action="store_true", default=None, help="onnxruntime rows"
    )
    onnx.add_argument("--no-onnx", dest="onnx", action="store_false", help="no onnxruntime rows")
    parser.add_argument(
        "--onnx-keep-rates", type=float, nargs="+", default=list(DEFAULT_ONNX_KEEP_RATES)
    )
    parser.add_argument("--no-teacher", dest="teacher", action="store_false", help="skip ViT-B")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def command_line(args: argparse.Namespace, prog: str) -> str:
    """``prog`` followed by every option of ``args`` that differs from its default."""
    parser = add_arguments(argparse.ArgumentParser(add_help=False))
    defaults = parser.parse_args([])
    parts = [prog]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value == getattr(defaults, action.dest):
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if value == action.const:
                parts.append(action.option_strings[0])
        elif isinstance(value, list):
            parts += [action.option_strings[0], *map(str, value)]
        else:
            parts += [action.option_strings[0], str(value)]
    return " ".join(parts)


def main_from_args(args: argparse.Namespace, command: str) -> int:
    """Run the benchmark for each batch size and print the markdown tables."""
    preset = TINY_PRESET if args.tiny else {}
    log = (
        None
        if args.quiet
        else (lambda msg: print(f"[benchmark] {msg}", file=sys.stderr, flush=True))
    )
    parts = [f"Command: `{command}`"]
    print(parts[0])
    for batch_size in args.batch_size:
        report = run_benchmark(
            batch_size=batch_size,
            keep_rates=args.keep_rates,
            repeats=args.repeats,
            warmup=args.warmup,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads or None,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            onnx=args.onnx,
            onnx_keep_rates=args.onnx_keep_rates,
            teacher=args.teacher,
            memory=args.memory,
            seed=args.seed,
            log=log,
            **preset,
        )
        table = f"\n### Batch {batch_size}\n\n{format_table(report)}\n"
        print(table, flush=True)
        parts.append(table)
    if args.out:
        Path(args.out).write_text("\n".join(parts))
    return 0


__all__ = [
    "BenchmarkReport",
    "BenchmarkRow",
    "Timing",
    "add_arguments",
    "block_macs",
    "command_line",
    "dense_macs",
    "flops_bound",
    "format_table",
    "main_from_args",
    "predictor_macs",
    "run_benchmark",
    "student_macs",
    "time_forward",
]
