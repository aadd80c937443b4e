"""Export a SUREID model's inference graph to ONNX, and run it with onnxruntime.

The student's eval path is exported as it runs in PyTorch: per stage a top-k over the keep scores
and one indexed copy (ONNX ``TopK`` + ``Gather``), so onnxruntime computes on the kept tokens
only. The batch dimension is dynamic (named ``batch``); every other dimension is a number in the
file. Outputs: ``embeddings`` ([batch, C], the inference feature, not L2-normalised) and, for a
student with HTS, ``kept_indices_1..J`` ([batch, k_j] patch-grid indices, k_j the stage's keep
count ``config.stage_keep_counts[j-1]``, in top-k order, not sorted).

Uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs no extra package, whereas
the torch.export-based one needs ``onnxscript``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .configuration_sureid import SureidError

DEFAULT_OPSET = 17
BATCH_AXIS = "batch"

logger = logging.getLogger(__name__)


class _InferenceGraph(nn.Module):
    """The model's eval forward with plain tensor outputs (what ONNX can name)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values)
        return (out.embeddings, *(out.kept_indices or ()))


def output_names(model: nn.Module) -> list[str]:
    """Names of the exported graph's outputs for ``model``."""
    config = model.config
    stages = len(config.stage_keep_counts) if getattr(config, "hts_enabled", False) else 0
    return ["embeddings", *(f"kept_indices_{j + 1}" for j in range(stages))]


def output_shapes(model: nn.Module) -> dict[str, list[int | str]]:
    """Each exported output's shape: ``"batch"`` (the dynamic axis) first, then the sizes.

    ``embeddings``: ``[batch, hidden_size]``; ``kept_indices_j``: ``[batch, k_j]``, ``k_j`` the
    stage's keep count (``config.stage_keep_counts[j - 1]``).
    """
    config = model.config
    shapes: dict[str, list[int | str]] = {"embeddings": [BATCH_AXIS, int(config.hidden_size)]}
    for name, keep in zip(output_names(model)[1:], getattr(config, "stage_keep_counts", ())):
        shapes[name] = [BATCH_AXIS, int(keep)]
    return shapes


def _fix_output_shapes(path: Path, shapes: dict[str, list[int | str]]) -> None:
    """Write ``shapes`` into the file's output declarations (the tracer names some sizes it
    cannot prove constant, e.g. ``TopKkept_indices_1_dim_1``, instead of giving the number)."""
    try:
        import onnx
    except ImportError:
        logger.warning(
            "onnx is not installed, so %s keeps the exporter's names for some output sizes "
            "(pip install 'sureid[onnx]' to write the numbers)",
            path,
        )
        return
    graph = onnx.load(str(path), load_external_data=False)
    for output in graph.graph.output:
        shape = shapes.get(output.name)
        if shape is None:
            continue
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise SureidError(
                f"{path}: the exported output {output.name} has {len(dims)} dimensions, "
                f"expected {len(shape)} ({shape}); re-export with this model and torch version"
            )
        for dim, size in zip(dims, shape):
            dim.Clear()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.save(graph, str(path))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    example_batch_size: int = 2,
) -> Path:
    """Write ``model``'s inference graph (true token dropping for a student) to ``path``.

    ``model`` is a ``SureidStudentModel`` or ``SureidTeacherModel`` (float32, any device); its
    training/eval mode is restored afterwards. The batch size of the file is dynamic (axis
    ``"batch"``); the other output sizes are numbers (:func:`output_shapes`).
    """
    from .modeling_sureid import SureidStudentModel, SureidTeacherModel

    if not isinstance(model, SureidStudentModel | SureidTeacherModel):
        raise SureidError(
            f"export_onnx takes a SureidStudentModel or SureidTeacherModel, got "
            f"{type(model).__name__}; load one with SureidModel.from_pretrained(path)"
        )
    if example_batch_size < 2:
        # A batch of 1 lets the tracer fold the batch size into constants in places.
        raise SureidError(f"example_batch_size must be >= 2, got {example_batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    param = next(model.parameters())
    example = torch.randn(
        example_batch_size,
        config.num_channels,
        *config.image_size,
        device=param.device,
        dtype=param.dtype,
    )
    names = output_names(model)
    was_training = model.training
    graph = _InferenceGraph(model).eval()
    try:
        with warnings.catch_warnings():
            # The legacy exporter's deprecation notice, and the tracer's note on the input-shape
            # check in PatchEmbed (the shape is fixed by the config, so the trace is right).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=False,
                input_names=["pixel_values"],
                output_names=names,
                dynamic_axes={name: {0: BATCH_AXIS} for name in ["pixel_values", *names]},
                opset_version=opset,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    _fix_output_shapes(path, output_shapes(model))
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (``threads`` intra-op threads)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise SureidError(
            "onnxruntime is not installed; install the extra: pip install 'sureid[onnx]'"
        ) from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; write it with export_onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(
    model: nn.Module, path: str | Path, batch_sizes=(1, 3), seed: int = 0
) -> dict[int, float]:
    """Max absolute difference of the embeddings, onnxruntime vs PyTorch, per batch size.

    Random inputs; ``model`` in eval mode on its own device. Also checks that the kept tokens
    agree (as sets per image) and raises ``SureidError`` if they do not.
    """
    session = onnx_session(path)
    param = next(model.parameters())
    config = model.config
    names = output_names(model)
    model.eval()
    result = {}
    generator = torch.Generator().manual_seed(seed)
    for batch_size in batch_sizes:
        pixels = torch.randn(
            batch_size, config.num_channels, *config.image_size, generator=generator
        )
        got = session.run(names, {"pixel_values": pixels.numpy()})
        with torch.inference_mode():
            out = model(pixels.to(param.device, param.dtype))
        want = [out.embeddings, *(out.kept_indices or ())]
        for name, g, w in zip(names[1:], got[1:], want[1:]):
            if not torch.equal(torch.from_numpy(g).sort(1).values, w.cpu().sort(1).values):
                raise SureidError(
                    f"{path}: onnxruntime keeps other tokens than PyTorch ({name}, batch "
                    f"{batch_size}); re-export with this model and torch version"
                )
        diff = (torch.from_numpy(got[0]) - want[0].float().cpu()).abs().max()
        result[batch_size] = float(diff)
    return result


__all__ = [
    "BATCH_AXIS",
    "DEFAULT_OPSET",
    "export_onnx",
    "onnx_session",
    "output_names",
    "output_shapes",
    "verify_onnx",
]
