"""Throughput / latency / memory of SUREID models beside the dense models they come from.

One run measures every row side by side: timm's dense DeiT-S (the baseline), the student at keep
1.0 and at each keep rate (same weights), the dense ViT-B teacher, and, when onnxruntime is
importable, exported students on onnxruntime (CPU). Rows are timed round-robin
(:func:`time_round_robin`: one call of each row per round, the order rotated every round, after
warm-up rounds), so a slow spell of a shared machine hits every row alike; each row's speed-up
over the baseline is the median of its per-round ratios (:func:`rows_from_times`).

:func:`run_benchmark` reads as its steps: check the options (device and dtype by
``sureid.inference``'s policy), build the rows (baseline, students, teacher, onnxruntime),
record the environment, time the rows, measure their memory. The FLOPs bounds come from
:mod:`sureid.flops` (re-exported here): the paper's count, and ``as run`` (the predictors added,
the last block computed for the class token's row only).

``time_forward`` is the small helper ``sureid demo`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .configuration_sureid import SureidConfig, SureidError, SureidStudentConfig
from .convert import load_timm_state_dict, timm_architecture
from .flops import block_macs, dense_macs, flops_bound, predictor_macs, student_macs
from .inference import resolve_autocast_dtype, resolve_device

DEFAULT_KEEP_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_ONNX_KEEP_RATES = (1.0, 0.7, 0.5)
BASELINE_TIMM = "deit_small_patch16_224"
TEACHER_TIMM = "vit_base_patch16_224"

# A tiny architecture for smoke tests (hidden 64, depth 6, 64x32 images, patch 8 -> 32 tokens).
# Its rows are labelled as what they are: not DeiT-S and ViT-B, only laid out like them.
TINY_PRESET = {
    "image_size": (64, 32),
    "timm_overrides": {"patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 4},
    "teacher_overrides": {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 4},
    "student_overrides": {"sparsify_layers": (1, 3, 5)},
    "baseline_label": "tiny timm ViT (deit_small layout, hidden 64, dense)",
    "teacher_label": "SUREID teacher, tiny ViT (vit_base layout, hidden 96, dense)",
}
# Printed above the tables of a --tiny run.
TINY_NOTE = (
    "Smoke test (--tiny): tiny random-weight models (hidden 64 and 96, depth 6, 32 image "
    "tokens), timed for a few rounds. The times and speed-ups below only show that the "
    "benchmark runs; they are not a measurement of SUREID (at this size fixed overheads "
    "dominate). docs/benchmarks.md has the measured tables."
)


# --------------------------------------------------------------------------------------------
# The small helper (used by `sureid demo`) and the tokens column
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


def format_tokens(config: SureidConfig) -> str:
    """Image tokens per stretch of blocks, e.g. ``128>90>63>44`` (a dense model: ``128``)."""
    if not isinstance(config, SureidStudentConfig) or not config.hts_enabled:
        return str(config.num_patches)
    return ">".join(str(n) for n in [config.num_patches, *config.stage_keep_counts])


# --------------------------------------------------------------------------------------------
# Rows of the table
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
class Candidate:
    """A row before measurement: a zero-argument call plus what the table says about it.

    ``macs`` / ``macs_as_run``: block multiply-adds per image (``sureid.flops``), the paper's
    count and what the row executes; ``memory``: a call that measures the row's peak MiB.
    """

    name: str
    backend: str
    call: Callable[[], object]
    keep_rate: float | None = None
    tokens: str = ""
    macs: int | None = None
    macs_as_run: int | None = None
    memory: Callable[[], float | None] | None = None


def rows_from_times(
    candidates: Sequence[Candidate],
    wall_ms: Mapping[str, Sequence[float]],
    cpu_ms: Mapping[str, Sequence[float]],
    batch_size: int,
    peak_mib: Mapping[str, float | None] | None = None,
) -> list[BenchmarkRow]:
    """The table's rows from per-round times; ``candidates[0]`` is the baseline.

    A row's speed-up is the median over rounds of (baseline time / row time) within the round
    (``wall_ms[name][r]`` is round r's time), its range the min and max of those ratios; the FLOPs
    bounds divide the baseline's MACs by the row's.
    """
    base = candidates[0]
    rows = []
    for c in candidates:
        wall, cpu = wall_ms[c.name], cpu_ms[c.name]
        ratios = [b / t for b, t in zip(wall_ms[base.name], wall)]
        cpu_ratios = [b / t for b, t in zip(cpu_ms[base.name], cpu) if t > 0]
        rows.append(
            BenchmarkRow(
                name=c.name,
                backend=c.backend,
                keep_rate=c.keep_rate,
                tokens=c.tokens,
                batch_size=batch_size,
                median_ms=statistics.median(wall),
                min_ms=min(wall),
                max_ms=max(wall),
                cpu_median_ms=statistics.median(cpu),
                speedup=statistics.median(ratios),
                speedup_min=min(ratios),
                speedup_max=max(ratios),
                speedup_cpu=statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
                flops_bound=base.macs / c.macs if c.macs else None,
                flops_bound_as_run=base.macs / c.macs_as_run if c.macs_as_run else None,
                gmacs_per_image=c.macs_as_run / 1e9 if c.macs_as_run else None,
                peak_mib=(peak_mib or {}).get(c.name),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def time_round_robin(
    calls: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 0,
    sync: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
    calls_per_round: Mapping[str, int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Milliseconds per call of each named call, wall and process CPU time, one value per round
    and name.

    Each round runs every entry once, starting one entry later than the round before (so no
    entry always follows the same neighbour), and a slow spell of a shared machine hits every
    entry alike; the first ``warmup`` rounds are not recorded. ``calls_per_round``: how many
    times an entry is called back to back in its turn (default 1); its value for the round is
    the mean per call, so a short call is timed over enough work to rise above the noise.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each turn.
    """
    counts = dict(calls_per_round or {})
    sync = sync or (lambda: None)
    say = log or (lambda _msg: None)
    items = list(calls.items())
    wall: dict[str, list[float]] = {name: [] for name, _ in items}
    cpu: dict[str, list[float]] = {name: [] for name, _ in items}
    for r in range(warmup + repeats):
        shift = r % len(items)
        for name, call in items[shift:] + items[:shift]:
            n = max(1, int(counts.get(name, 1)))
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                call()
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                wall[name].append((t1 - t0) * 1000.0 / n)
                cpu[name].append((c1 - c0) * 1000.0 / n)
        kind = "warm-up" if r < warmup else "timed"
        say(f"round {r + 1}/{warmup + repeats} ({kind}) done")
    return wall, cpu


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work (a no-op on the CPU), for honest timings."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


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


_CPU_DEVICE_TYPE = 0  # c10::DeviceType::CPU, as the profiler's trace writes it


def peak_cpu_mib(call: Callable[[], object]) -> float | None:
    """Peak MiB the PyTorch CPU allocator held during ``call`` beyond what it held before.

    Read from the ``[memory]`` events of the profiler's Chrome trace (public
    ``torch.profiler`` API; no tracemalloc, which does not see torch's allocator): the running
    sum of their bytes in time order. ``None`` where the trace has no CPU memory events.
    """
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory(prefix="sureid-memory-") as folder:
        trace_path = Path(folder) / "trace.json"
        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            call()
        prof.export_chrome_trace(str(trace_path))
        events = json.loads(trace_path.read_text()).get("traceEvents", [])
    allocations = sorted(
        (e.get("ts", 0.0), e["args"].get("Ev Idx", 0), e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == _CPU_DEVICE_TYPE
    )
    if not allocations:
        return None
    current = peak = 0
    for _, _, size in allocations:
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


# --------------------------------------------------------------------------------------------
# Checks: device, dtype and the run's options
# --------------------------------------------------------------------------------------------

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def resolve_device_and_dtype(
    device: str | torch.device = "auto", dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device the rows run on and the dtype their weights and inputs are cast to.

    The policy is ``sureid.inference``'s, as ``extract_features`` uses it: ``resolve_device``
    ("auto": CUDA, else Apple MPS, else the CPU) and ``resolve_autocast_dtype`` (``None``:
    bfloat16 on GPUs that support it, else float16; float32 elsewhere). The benchmark casts
    instead of autocasting, so it measures the half-precision model itself.
    """
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SureidError(
            f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SureidError(f"device {device!r} was asked for but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SureidError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}")
    return dev, resolve_autocast_dtype(dev, dtype) or torch.float32


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _check_run(
    batch_size: int,
    repeats: int,
    warmup: int,
    rates: Sequence[float],
    dev: torch.device,
    dt: torch.dtype,
    cuda_graphs: bool,
) -> None:
    """Raise ``SureidError`` naming the first option the run cannot honour."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise SureidError(
            f"need batch_size >= 1, repeats >= 1, warmup >= 0; got batch_size={batch_size}, "
            f"repeats={repeats}, warmup={warmup}"
        )
    for rate in rates:
        if not 0.0 < rate <= 1.0:
            raise SureidError(f"keep rates must be in (0, 1], got {rate}")
    if cuda_graphs and dev.type != "cuda":
        raise SureidError(
            "cuda_graphs needs a CUDA device; drop --cuda-graphs or use --device cuda"
        )
    if dev.type == "cpu" and dt == torch.float16:
        raise SureidError(
            "float16 on the CPU is not a fast path in PyTorch; use float32 or bfloat16"
        )


def _want_onnx(onnx: bool | None, dev: torch.device, dt: torch.dtype) -> bool:
    """Whether to add onnxruntime rows: ``None`` means when possible (CPU, float32, installed)."""
    cpu_float32 = dev.type == "cpu" and dt == torch.float32
    if onnx is None:
        return cpu_float32 and _onnxruntime_available()
    if onnx and not _onnxruntime_available():
        raise SureidError(
            "onnxruntime rows asked for but onnxruntime is not installed: pip install 'sureid[onnx]'"
        )
    if onnx and not cpu_float32:
        raise SureidError("onnxruntime rows are measured on the CPU in float32 only; drop --onnx")
    return onnx


# --------------------------------------------------------------------------------------------
# Building the rows
# --------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What every PyTorch row of one run shares: device, dtype, the batch, the options."""

    device: torch.device
    dtype: torch.dtype
    pixels: torch.Tensor  # float32 on the CPU (onnxruntime's feed)
    compile: bool = False
    cuda_graphs: bool = False
    memory: bool = True
    device_pixels: torch.Tensor = field(init=False)  # the batch on the device, in the dtype

    def __post_init__(self) -> None:
        self.device_pixels = self.pixels.to(self.device, self.dtype)


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
    arch = timm_architecture(timm_model, name)
    arch.update(image_size=tuple(image_size), drop_path_rate=0.0, **fields)
    model = cls(cls.config_class(**arch))
    load_timm_state_dict(model, name, checkpoint=timm_model)
    return model.eval()


def _build_students(
    base_timm: nn.Module, name: str, image_size, fields: dict, rates: Sequence[float]
) -> dict[float, nn.Module]:
    """A student per keep rate (1.0 always), all with the baseline's weights.

    The rates below 1.0 also share one set of (random) predictor weights, so the rows differ by
    their keep rate alone.
    """
    from .modeling_sureid import SureidStudentModel

    students: dict[float, nn.Module] = {}
    shared_predictors = None
    for rate in sorted({1.0, *rates}, reverse=True):
        model = _sureid_from_timm(
            SureidStudentModel, base_timm, name, image_size, keep_rate=rate, **fields
        )
        if rate < 1.0:
            if shared_predictors is None:
                shared_predictors = model.predictors.state_dict()
            else:
                model.predictors.load_state_dict(shared_predictors)
        students[rate] = model
    return students


def _torch_call(
    model: nn.Module, setup: _Setup
) -> tuple[Callable[[], object], Callable[[], float | None]]:
    """The row's timed call (the model on the device, cast, maybe compiled or graph-captured)
    and the call that measures its peak memory."""
    model = model.to(setup.device, setup.dtype).eval()
    run_model = torch.compile(model) if setup.compile else model
    pixels = setup.device_pixels
    if setup.cuda_graphs:
        with torch.inference_mode():
            replay = _cuda_graph(run_model, pixels)

        def call():
            replay()

        return call, lambda: None  # graph memory lives in its private pool

    def call():
        with torch.inference_mode():
            return run_model(pixels)

    if not setup.memory or setup.device.type == "mps":
        return call, lambda: None
    if setup.device.type == "cuda":
        return call, lambda: _peak_cuda_mib(call, setup.device)
    return call, lambda: peak_cpu_mib(call)


def _torch_candidate(
    name: str,
    model: nn.Module,
    setup: _Setup,
    tokens: str,
    macs: int,
    macs_as_run: int,
    keep_rate: float | None = None,
) -> Candidate:
    call, memory = _torch_call(model, setup)
    return Candidate(name, "torch", call, keep_rate, tokens, macs, macs_as_run, memory)


def _row_label(prefix: str, name: str, overrides: dict | None, label: str | None) -> str:
    """The name of a dense row: ``label`` when given, else ``PREFIX NAME (dense)``, with the
    overridden sizes when there are any (the row is then not the model ``name`` stands for)."""
    if label:
        return label
    changed = ", ".join(f"{key} {value}" for key, value in (overrides or {}).items())
    return f"{prefix} {name}{f' with {changed}' if changed else ''} (dense)"


def _baseline_candidate(timm_model: nn.Module, label: str, config, setup: _Setup) -> Candidate:
    """timm's dense model: every block on every token, the last one included."""
    macs = dense_macs(config)
    return _torch_candidate(label, timm_model, setup, format_tokens(config), macs, macs)


def _student_candidate(model: nn.Module, setup: _Setup) -> Candidate:
    cfg = model.config
    return _torch_candidate(
        f"SUREID student, keep {float(cfg.keep_rate)}",
        model,
        setup,
        format_tokens(cfg),
        student_macs(cfg),
        student_macs(cfg, as_run=True),
        keep_rate=cfg.keep_rate,
    )


def _teacher_candidate(
    name: str, image_size, overrides: dict, setup: _Setup, label: str | None = None
) -> Candidate:
    from .modeling_sureid import SureidTeacherModel

    teacher_timm = _timm_vit(name, image_size, overrides)
    model = _sureid_from_timm(SureidTeacherModel, teacher_timm, name, image_size)
    del teacher_timm
    cfg = model.config
    return _torch_candidate(
        _row_label("SUREID teacher", name, overrides, label),
        model,
        setup,
        format_tokens(cfg),
        dense_macs(cfg),
        dense_macs(cfg, as_run=True),
    )


def _onnx_candidate(model: nn.Module, folder: Path, pixels: torch.Tensor) -> Candidate:
    """The student exported to ONNX (into ``folder``) and run by onnxruntime on the CPU."""
    from .export import export_onnx, onnx_session

    cfg = model.config
    path = export_onnx(model, folder / f"student_{cfg.keep_rate:g}.onnx")
    session = onnx_session(path, threads=torch.get_num_threads())
    feed = {"pixel_values": pixels.numpy()}
    return Candidate(
        f"SUREID student, keep {float(cfg.keep_rate)} (onnxruntime)",
        "onnxruntime",
        lambda: session.run(["embeddings"], feed),
        cfg.keep_rate,
        format_tokens(cfg),
        student_macs(cfg),
        student_macs(cfg, as_run=True),
        None,
    )


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Device, threads and library versions, as printed above the table."""
    from importlib.metadata import version

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("timm", "transformers", "onnxruntime"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    env["sureid"] = version("sureid")  # the installed distribution's, as pyproject reads it
    if device.type == "cuda":
        env["device"] = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    elif device.type == "mps":
        env["device"] = f"Apple MPS ({_cpu_name()})"
    else:
        env["device"] = (
            f"CPU {_cpu_name()}, {os.cpu_count()} logical cores, "
            f"ISA {torch.backends.cpu.get_cpu_capability()}"
        )
    env["torch threads"] = (
        f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    )
    env["dtype"] = str(dtype).removeprefix("torch.")
    return env


def _loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _run_environment(setup: _Setup, warmup: int, repeats: int) -> dict[str, str]:
    """``environment()`` plus the run's own settings and the load average at its start."""
    batch_size, _, height, width = setup.pixels.shape
    env = environment(setup.device, setup.dtype)
    env.update(
        {
            "batch size": str(batch_size),
            "image size": f"{height}x{width}",
            "rounds": f"{warmup} warm-up + {repeats} timed, round-robin over the rows",
            "torch.compile": "on" if setup.compile else "off",
            "CUDA graphs": "on" if setup.cuda_graphs else "off",
            "load average (1/5/15 min) at start": _loadavg(),
        }
    )
    return env


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


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
    baseline_label: str | None = None,
    teacher_label: str | None = None,
) -> BenchmarkReport:
    """Build every row, time them round-robin and return the table's rows.

    ``device`` / ``dtype``: as :func:`resolve_device_and_dtype`. ``onnx`` None adds onnxruntime
    rows when onnxruntime is importable (CPU, float32 only). ``compile`` wraps the PyTorch rows
    in ``torch.compile``; ``cuda_graphs`` (GPU only) replays each PyTorch row from a captured
    CUDA graph. ``*_overrides`` change the architecture (timm keyword arguments for the baseline
    and teacher, config fields for the students): the smoke test uses ``TINY_PRESET``. The
    baseline and teacher rows are named ``baseline_label`` / ``teacher_label``, else by the
    timm name (and the overridden sizes, when there are overrides). Weights are random (timm,
    ``pretrained=False``): speed does not depend on them, and the students share the
    baseline's weights.
    """
    say = log or (lambda _msg: None)
    dev, dt = resolve_device_and_dtype(device, dtype)
    _check_run(batch_size, repeats, warmup, [*keep_rates, *onnx_keep_rates], dev, dt, cuda_graphs)
    onnx_rates = sorted(set(onnx_keep_rates), reverse=True) if _want_onnx(onnx, dev, dt) else []
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pixels = torch.randn(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    setup = _Setup(dev, dt, pixels, compile, cuda_graphs, memory)

    label = _row_label("timm", timm_name, timm_overrides, baseline_label)
    say(f"building students from {timm_name} (random weights)")
    base_timm = _timm_vit(timm_name, image_size, dict(timm_overrides or {}))
    fields = dict(student_overrides or {})
    students = _build_students(base_timm, timm_name, image_size, fields, [*keep_rates, *onnx_rates])
    candidates = [_baseline_candidate(base_timm, label, students[1.0].config, setup)]
    for rate in [1.0, *sorted(set(keep_rates) - {1.0})]:
        candidates.append(_student_candidate(students[rate], setup))
    if teacher:
        say(f"building the teacher from {teacher_timm_name} (random weights)")
        overrides = dict(teacher_overrides or {})
        candidates.append(
            _teacher_candidate(teacher_timm_name, image_size, overrides, setup, teacher_label)
        )

    env = _run_environment(setup, warmup, repeats)
    with tempfile.TemporaryDirectory(prefix="sureid-bench-") as folder:
        for rate in onnx_rates:
            say(f"exporting the keep {float(rate)} student to ONNX")
            candidates.append(_onnx_candidate(students[rate], Path(folder), pixels))
        calls = {c.name: c.call for c in candidates}
        wall, cpu = time_round_robin(calls, repeats, warmup, synchronizer(dev), say)
        peaks = {c.name: c.memory() if c.memory is not None else None for c in candidates}
    env["load average (1/5/15 min) at end"] = _loadavg()
    return BenchmarkReport(rows_from_times(candidates, wall, cpu, batch_size, peaks), env)


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
        choices=DTYPE_CHOICES,
        default=None,
        help="weights and inputs cast to it; default bfloat16 on a GPU that supports it (else "
        "float16), float32 on the CPU (sureid.inference's policy)",
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
    """``prog`` followed by every option of ``args`` that differs from its default.

    Every option of :func:`add_arguments` is spelt ``--dest-with-dashes`` and every switch
    ``--name`` / ``--no-name``, so the flag follows from the option's name and value (a test
    parses the result back).
    """
    defaults = vars(add_arguments(argparse.ArgumentParser(add_help=False)).parse_args([]))
    parts = [prog]
    for dest, default in defaults.items():
        value = getattr(args, dest, default)
        if value == default:
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
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
    if args.tiny:
        parts.append(f"\n**{TINY_NOTE}**")
    print("\n".join(parts))
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
    "Candidate",
    "Timing",
    "add_arguments",
    "block_macs",
    "command_line",
    "dense_macs",
    "environment",
    "flops_bound",
    "format_table",
    "format_tokens",
    "main_from_args",
    "peak_cpu_mib",
    "predictor_macs",
    "resolve_device_and_dtype",
    "rows_from_times",
    "run_benchmark",
    "student_macs",
    "time_forward",
    "time_round_robin",
]
