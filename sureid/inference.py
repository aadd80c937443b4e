"""Feature extraction with true token dropping, and a transformers pipeline.

- :func:`list_images`: files and folders (searched recursively) -> the image files, in order.
- :func:`extract_features`: images (PIL, numpy, tensors, paths, or a ``datasets.Dataset``) ->
  L2-normalised float32 embeddings [N, C] in input order, the student in eval mode (so it
  really drops tokens), batched through a ``DataLoader`` whose collate runs
  :class:`~sureid.SureidImageProcessor`.
- ``pipeline("sureid-feature-extraction", model=...)``: the same embedding inside HF code.

Searching a gallery of these features is :mod:`sureid.gallery`.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline

from .configuration_sureid import SureidError
from .image_processing_sureid import (
    SureidImageProcessor,
    as_image_list,
    load_image,
    to_rgb,
    to_supported,
)

logger = logging.getLogger(__name__)

# Fewer batches than this: no progress bar (it would only flash).
_MIN_BATCHES_FOR_PROGRESS = 4
# What reading one input may raise that means "this input is bad" (skippable), not "bug".
_INPUT_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# What list_images takes from a folder (lower case; a file's suffix is compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------


def _hidden(relative: Path) -> bool:
    """A file or folder a user did not put there as an image: hidden (".name"), or a
    Synology thumbnail folder (``@eaDir``)."""
    return any(part.startswith(".") or part == "@eaDir" for part in relative.parts)


def list_images(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, missing: str = "raise"
) -> list[str]:
    """The image files named by ``paths``: files as given, folders expanded to their images.

    A folder contributes every file under it (recursively) whose extension is one of
    ``IMAGE_EXTENSIONS`` (any case), sorted by path, except hidden ones (a name or folder
    starting with ".", such as macOS's ``._x.jpg`` side files, and NAS thumbnail folders,
    ``@eaDir``); files named directly are kept whatever
    their extension (reading them decides). Order: the order of ``paths``, each folder's images
    in sorted order. A path that does not exist raises ``FileNotFoundError`` naming it
    (``missing="keep"`` keeps it in the list instead, for a caller that skips unreadable inputs
    later); a folder without images raises ``SureidError`` (a ``ValueError``) naming it.
    """
    if missing not in ("raise", "keep"):
        raise ValueError(f"missing must be 'raise' or 'keep', got {missing!r}")
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            images = sorted(
                (
                    p
                    for p in path.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS
                    and not _hidden(p.relative_to(path))
                    and p.is_file()
                ),
                key=lambda p: p.relative_to(path).parts,  # folder by folder, as a tree lists them
            )
            if not images:
                raise SureidError(
                    f"no image files in the folder {given} (looked for "
                    f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}, any case, in it and "
                    "its subfolders); is it the right folder?"
                )
            found.extend(str(p) for p in images)
        elif path.exists() or missing == "keep":
            found.append(str(given))
        else:
            raise FileNotFoundError(
                f"{given}: no such file or folder (pass image files or folders that hold them)"
            )
    return found


# --------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU if there is one, else Apple MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from err


def resolve_autocast_dtype(
    device: torch.device, dtype: torch.dtype | str | None = None
) -> torch.dtype | None:
    """The autocast dtype for ``device``; None means plain float32 (no autocast).

    ``dtype=None`` (or ``"auto"``) picks bfloat16 on GPUs that support it, float16 on other
    GPUs, and float32 on the CPU (where half precision is rarely faster for a ViT and costs
    accuracy).
    """
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = None
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype.lower()]
    if dtype is None:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype == torch.float32:
        return None
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


# --------------------------------------------------------------------------------------------
# Inputs: one item at a time (in DataLoader workers when num_workers > 0)
# --------------------------------------------------------------------------------------------


def _describe(item: Any) -> str:
    if isinstance(item, str | os.PathLike):
        return str(item)
    if isinstance(item, Image.Image):
        return f"PIL image {item.size[0]}x{item.size[1]} {item.mode}"
    if isinstance(item, np.ndarray | torch.Tensor):
        return f"{type(item).__name__} of shape {tuple(item.shape)}"
    return type(item).__name__


class _InputSet(torch.utils.data.Dataset):
    """Indexable view of the inputs; ``[i]`` loads item i and reports (not raises) bad inputs."""

    def __init__(self, inputs: Any, image_column: str | None = None):
        self.dataset = None
        self.items: Sequence[Any] | None = None
        self.paths: list[str] | None = None
        if _is_hf_dataset(inputs):
            import datasets

            column = image_column or _find_image_column(inputs)
            feature = inputs.features[column]
            if isinstance(feature, datasets.Image):
                # Decode ourselves, so a corrupt file gives an error that names it.
                inputs = inputs.cast_column(column, datasets.Image(decode=False))
            self.dataset = inputs.select_columns([column])
            self.column = column
            if "path" in inputs.column_names:
                self.paths = [str(p) for p in inputs["path"]]
        else:
            inputs = as_image_list(
                inputs, "extract features from", ", or a datasets.Dataset with an image column"
            )
            self.items = inputs

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.items)

    def source(self, i: int) -> str:
        """What input i is, for messages: its path when known."""
        if self.paths is not None:
            return self.paths[i]
        if self.items is not None:
            return _describe(self.items[i])
        value = self.dataset[i][self.column]
        if isinstance(value, dict) and value.get("path"):
            return str(value["path"])
        return f"row {i} of the data set"

    def __getitem__(self, i: int) -> tuple[int, Any, str | None, str | None]:
        """(index, image ready for the processor or None, error kind, error message)."""
        try:
            if self.dataset is not None:
                image = self._load_row(i)
            else:
                image = to_supported(self.items[i])
        except FileNotFoundError as err:
            return i, None, "missing", str(err)
        except _INPUT_ERRORS as err:
            return i, None, "unreadable", str(err)
        return i, image, None, None

    def _load_row(self, i: int) -> Any:
        value = self.dataset[i][self.column]
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            if value.get("bytes"):
                name = value.get("path") or self.source(i)
                try:
                    with Image.open(io.BytesIO(value["bytes"])) as image:
                        image.load()
                        return to_rgb(image, name)
                except (OSError, SyntaxError) as err:
                    raise SureidError(
                        f"cannot decode {name} as an image ({err}); is it corrupt?"
                    ) from err
            if value.get("path"):
                return load_image(value["path"])
            raise SureidError(f"row {i} of the data set has neither image bytes nor a path")
        return to_supported(value)


def _is_hf_dataset(obj: Any) -> bool:
    # A datasets.Dataset can only exist if its module is loaded; importing it costs seconds.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, datasets.Dataset)


def _find_image_column(dataset) -> str:
    import datasets

    if "image" in dataset.column_names:
        return "image"
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise SureidError(
        f"the data set has no image column (columns: {dataset.column_names}); name it with "
        "image_column=..."
    )


class _Collate:
    """Runs the image processor on a batch (in the worker), keeping track of bad inputs."""

    def __init__(self, processor: SureidImageProcessor):
        self.processor = processor

    def __call__(self, batch: list[tuple[int, Any, str | None, str | None]]) -> dict[str, Any]:
        errors = [(i, kind, msg) for i, image, kind, msg in batch if image is None]
        good = [(i, image) for i, image, _, _ in batch if image is not None]
        pixel_values = None
        if good:
            try:
                pixel_values = self._process([image for _, image in good])
            except _INPUT_ERRORS + (TypeError, RuntimeError):
                # Find the culprit(s) one by one, so one bad input does not sink the batch.
                kept, tensors = [], []
                for i, image in good:
                    try:
                        tensors.append(self._process([image]))
                        kept.append((i, image))
                    except _INPUT_ERRORS + (TypeError, RuntimeError) as err:
                        errors.append((i, "unreadable", f"the image processor failed: {err}"))
                good = kept
                pixel_values = torch.cat(tensors) if tensors else None
        return {
            "indices": torch.tensor([i for i, _ in good], dtype=torch.long),
            "pixel_values": pixel_values,
            "errors": sorted(errors),
        }

    def _process(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images, return_tensors="pt")["pixel_values"]


def _build_loader(
    data: _InputSet,
    processor: SureidImageProcessor,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches of ``data`` in order, preprocessed by ``processor`` (bad inputs reported in each
    batch's ``errors``, not raised, so the caller decides)."""
    return torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(processor),
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def iter_pixel_batches(
    inputs,
    processor: SureidImageProcessor,
    batch_size: int = 64,
    *,
    image_column: str | None = None,
):
    """Yield ``(indices, pixel_values)`` batches of ``inputs`` in order, preprocessed.

    For code that needs more than embeddings from each batch (per-token diagnostics such as
    ``analysis.check_token_selection``). Accepts what ``extract_features`` accepts and loads
    it the same way; a bad input raises an error naming it.
    """
    data = _InputSet(inputs, image_column)
    for batch in _build_loader(data, processor, batch_size):
        for i, kind, message in batch["errors"]:
            _raise_input_error(i, data.source(i), kind, message)
        yield batch["indices"], batch["pixel_values"]


# --------------------------------------------------------------------------------------------
# extract_features
# --------------------------------------------------------------------------------------------


@dataclass
class SkippedInput:
    """An input that ``on_error="skip"`` left out: its position, what it was, and why."""

    index: int
    source: str
    error: str


@dataclass
class FeatureResult:
    """What :func:`extract_features` returns when asked for more than the features.

    ``features[r]`` belongs to input ``indices[r]``; inputs in ``skipped`` have no row, so
    ``len(features) == num_inputs - len(skipped)``. ``kept_indices`` (student, when asked): one
    ``[len(features), k_j]`` tensor per HTS stage of patch-grid indices (row-major over
    ``config.grid_size``) of the tokens kept at that stage.
    """

    features: torch.Tensor
    indices: torch.Tensor
    skipped: list[SkippedInput] = field(default_factory=list)
    kept_indices: tuple[torch.Tensor, ...] | None = None
    num_inputs: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Throughput of the whole call (loading, preprocessing and the model)."""
        return len(self.features) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def skipped_indices(self) -> list[int]:
        return [s.index for s in self.skipped]


# Ends every bad-input error; the CLI swaps it for its own flag (--skip-errors).
SKIP_HINT = "(pass on_error='skip' to leave bad inputs out and list them)"


def _raise_input_error(index: int, source: str, kind: str, message: str) -> None:
    text = message if source in message else f"{source}: {message}"
    text = f"input {index}: {text} {SKIP_HINT}"
    raise FileNotFoundError(text) if kind == "missing" else SureidError(text)


def _non_finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or inf (empty for a sound model)."""
    state = model.state_dict()
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _non_finite_rows(model, data, rows: torch.Tensor, on_error: str, skipped: list) -> None:
    """Inputs whose embedding came out NaN / inf: raise naming the first, or list them all."""
    bad = _non_finite_weights(model)
    if bad:
        why = (
            f"the model's weights are not finite ({len(bad)} tensors, e.g. {bad[0]}): the "
            "checkpoint is broken (a diverged training run?), so every embedding is meaningless"
        )
    else:
        why = "the model's weights are finite, so this input drives it out of range"
    message = f"the model gave a NaN/inf embedding; {why}"
    for i in rows.tolist():
        if on_error == "raise":
            _raise_input_error(i, data.source(i), "non-finite", message)
        logger.warning("skipped input %d (%s): %s", i, data.source(i), message)
        skipped.append(SkippedInput(i, data.source(i), message))


def load_model(model):
    """A SUREID model as given, or loaded from a checkpoint directory / hub id (teacher or
    student, ``SureidModel.from_pretrained``); anything else raises naming its type."""
    if isinstance(model, str | os.PathLike):
        from .modeling_sureid import SureidModel

        return SureidModel.from_pretrained(model)
    if not isinstance(model, torch.nn.Module):
        raise SureidError(
            f"model must be a SUREID model or a checkpoint path, got {type(model).__name__}"
        )
    return model


def extract_features(
    model,
    inputs,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    return_kept: bool = False,
    on_error: str = "raise",
    *,
    processor: SureidImageProcessor | None = None,
    image_column: str | None = None,
) -> torch.Tensor | FeatureResult:
    """ReID embeddings of ``inputs``: L2-normalised float32 [N, C] on the CPU, in input order.

    ``model``: a SUREID teacher / student (or a checkpoint directory / hub id). It runs in eval
    mode, so the student really drops tokens; its training flag is restored afterwards, and it
    is moved to ``device`` ("auto": CUDA if available, else CPU). ``inputs``: PIL images, numpy
    arrays, tensors (CxHxW images, as the processor takes them), file paths, or a
    ``datasets.Dataset`` with an image column.

    Loading and preprocessing run in a ``DataLoader`` (``num_workers`` processes; None = 0 on
    the CPU, where workers would compete with the model for the same cores, and up to 4 on a
    GPU, where they overlap loading with compute). On a GPU: autocast in ``dtype`` (None: bf16
    where supported, else fp16), pinned host memory and non-blocking copies.

    Returns the features tensor; with ``return_kept=True`` or ``on_error="skip"`` a
    :class:`FeatureResult` (features, their input indices, the skipped inputs, kept token
    indices). A missing, corrupt or non-image input raises an error naming it unless
    ``on_error="skip"``, which leaves it out and lists it in ``FeatureResult.skipped``; so does
    an input whose embedding comes out NaN / inf (no non-finite row is ever returned).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = load_model(model)
    dev = resolve_device(device)
    amp_dtype = resolve_autocast_dtype(dev, dtype)
    on_gpu = dev.type == "cuda"
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if on_gpu else 0
    if processor is None:
        processor = SureidImageProcessor.from_model_config(model.config)
    data = _InputSet(inputs, image_column)
    n = len(data)
    loader = _build_loader(data, processor, batch_size, num_workers, pin_memory=on_gpu)
    num_batches = (n + batch_size - 1) // batch_size
    show = progress and num_batches >= _MIN_BATCHES_FOR_PROGRESS
    from tqdm.auto import tqdm

    was_training = model.training
    model.to(dev)
    model.eval()
    collected = _Collected(model, data, on_error, return_kept)
    start = time.perf_counter()
    bar = tqdm(total=n, unit="img", desc="extracting features", disable=not show)
    try:
        _embed_batches(model, loader, dev, amp_dtype, collected, bar)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    feats = collected.features()
    if on_error == "raise" and not return_kept:
        return feats
    return collected.result(feats, seconds)


def precision(model, dev: torch.device, amp_dtype):
    """(the context a forward runs in, the dtype its inputs go in as) for ``amp_dtype``
    (:func:`resolve_autocast_dtype`): autocast and float32 inputs, or, for None, no autocast and
    the model's own dtype."""
    if amp_dtype is None:
        return nullcontext(), next(model.parameters()).dtype
    return torch.autocast(device_type=dev.type, dtype=amp_dtype), torch.float32


def _embed_batches(model, loader, dev: torch.device, amp_dtype, collected, bar) -> None:
    """Run ``model`` (already on ``dev``, in eval mode) over every batch of ``loader``.

    Without gradients and under autocast in ``amp_dtype`` (None: plain precision); each batch's
    bad inputs and embeddings go to ``collected`` (a :class:`_Collected`), and ``bar`` (a tqdm
    progress bar) advances by the batch's inputs, good or bad.
    """
    autocast, input_dtype = precision(model, dev, amp_dtype)
    with torch.inference_mode(), autocast:
        for batch in loader:
            collected.add_errors(batch["errors"])
            if batch["pixel_values"] is not None:
                pixels = batch["pixel_values"].to(dev, dtype=input_dtype, non_blocking=True)
                collected.add_output(model(pixel_values=pixels), batch["indices"])
            bar.update(len(batch["indices"]) + len(batch["errors"]))


class _Collected:
    """What :func:`extract_features` gathers batch by batch: the finite embeddings with their
    input indices, the inputs left out (``on_error="skip"``) and, if asked, the kept tokens."""

    def __init__(self, model, data: _InputSet, on_error: str, return_kept: bool):
        self.model, self.data, self.on_error, self.return_kept = model, data, on_error, return_kept
        self.embeddings: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.skipped: list[SkippedInput] = []
        self.kept: list[list[torch.Tensor]] | None = None

    def add_errors(self, errors) -> None:
        """Inputs the loader could not read: raise naming the first, or list them."""
        for i, kind, message in errors:
            source = self.data.source(i)
            if self.on_error == "raise":
                _raise_input_error(i, source, kind, message)
            logger.warning("skipped input %d (%s): %s", i, source, message)
            self.skipped.append(SkippedInput(i, source, message))

    def add_output(self, out, indices: torch.Tensor) -> None:
        """One batch's model output: its L2-normalised embeddings, never a NaN/inf row."""
        emb = F.normalize(out.embeddings.float(), dim=1).cpu()
        finite = torch.isfinite(emb).all(dim=1)
        if not bool(finite.all()):
            _non_finite_rows(self.model, self.data, indices[~finite], self.on_error, self.skipped)
        self.embeddings.append(emb[finite])
        self.indices.append(indices[finite])
        if self.return_kept and out.kept_indices is not None:
            if self.kept is None:
                self.kept = [[] for _ in out.kept_indices]
            for stage, idx in enumerate(out.kept_indices):
                self.kept[stage].append(idx.cpu()[finite])

    def features(self) -> torch.Tensor:
        """The embeddings so far, [N, C] (``[0, hidden_size]`` when there are none)."""
        if self.embeddings:
            return torch.cat(self.embeddings)
        return torch.empty(0, self.model.config.hidden_size)

    def result(self, feats: torch.Tensor, seconds: float) -> FeatureResult:
        n = len(self.data)
        if self.skipped:
            self.skipped.sort(key=lambda item: item.index)
            logger.warning(
                "skipped %d of %d inputs (see FeatureResult.skipped)", len(self.skipped), n
            )
        return FeatureResult(
            features=feats,
            indices=torch.cat(self.indices) if self.indices else torch.empty(0, dtype=torch.long),
            skipped=self.skipped,
            kept_indices=tuple(torch.cat(k) for k in self.kept) if self.kept else None,
            num_inputs=n,
            seconds=seconds,
        )


# --------------------------------------------------------------------------------------------
# transformers pipeline
# --------------------------------------------------------------------------------------------


class SureidFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """``pipeline("sureid-feature-extraction", model=...)``: one L2-normalised embedding per image.

    The stock ``image-feature-extraction`` task returns a model's first output (for SUREID the
    class token *before* the BNNeck, not normalised) and its ``pool`` option needs a
    ``pooler_output``; this task returns the ReID embedding that :func:`extract_features` gives.
    Call arguments: ``return_tensors=True`` for a tensor [C] instead of a list, and
    ``normalize=False`` for the raw embedding. Local paths are read with
    :func:`sureid.load_image` (errors name the file); URLs go through transformers.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()

    def _sanitize_parameters(
        self, image_processor_kwargs=None, return_tensors=None, normalize=None, **kwargs
    ):
        preprocess_params = dict(image_processor_kwargs or {})
        if "timeout" in kwargs:
            preprocess_params["timeout"] = kwargs["timeout"]
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = return_tensors
        if normalize is not None:
            postprocess_params["normalize"] = normalize
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, timeout=None, **image_processor_kwargs):
        if isinstance(image, str | os.PathLike) and not str(image).startswith(
            ("http://", "https://")
        ):
            image = load_image(image)
        elif isinstance(image, str):
            from transformers.image_utils import load_image as hf_load_image

            image = hf_load_image(image, timeout=timeout)
        inputs = self.image_processor(image, return_tensors="pt", **image_processor_kwargs)
        return {"pixel_values": inputs["pixel_values"].to(torch.float32)}

    def _forward(self, model_inputs):
        out = self.model(pixel_values=model_inputs["pixel_values"])
        return {"embeddings": out.embeddings}

    def postprocess(self, model_outputs, normalize=True, return_tensors=False):
        emb = model_outputs["embeddings"][0].float()
        if normalize:
            emb = F.normalize(emb, dim=0)
        return emb if return_tensors else emb.tolist()


PIPELINE_REGISTRY.register_pipeline(
    "sureid-feature-extraction",
    pipeline_class=SureidFeatureExtractionPipeline,
    pt_model=AutoModel,
    type="image",
)
