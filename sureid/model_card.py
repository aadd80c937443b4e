"""Model cards: the ``README.md`` beside a checkpoint's weights, for people and for the Hub.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` / ``EvalResult`` (the metadata
block is theirs, never hand-written YAML): ``library_name: sureid``, the licence, the tags, the
data sets, ``base_model`` when the weights started from a Hub checkpoint, and a ``model-index``
with R1 / mAP / mINP of the last evaluation *of these weights* and its protocol. The body says
what the model is, how to load it, how many tokens each stage keeps (and the measured speed-up
when one was measured), how it was trained, the teacher, and the limits.

Who writes one:

- ``SureidTrainer`` when it saves the final model (``save_model``; ``train_main`` writes it
  again after its final evaluation, so the card carries those metrics);
- ``sureid demo``, for each checkpoint it trains, with the R1 / mAP and speed-up it measured
  (``write_demo_cards``);
- ``save_pretrained``, only into a folder that has no ``README.md`` yet: a card without metrics
  (``write_default_card``). An existing card is never overwritten or removed there.

Nothing here invents a number: without metrics there is no ``model-index`` and the body says
that no evaluation was recorded; without a measured speed the body says it was not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .configuration_sureid import SureidError
from .data.datasets import canonical_dataset_name
from .zoo import dataset_title

CARD_FILE = "README.md"
LICENSE = "apache-2.0"  # the project's licence (pyproject.toml)
LIBRARY_NAME = "sureid"
PIPELINE_TAG = "image-feature-extraction"
TAGS = (
    "sureid",
    "person-reid",
    "occluded-person-reid",
    "token-pruning",
    "vision-transformer",
)
# (key in a metrics mapping, model-index metric type, display name)
_METRICS = (("R1", "rank-1", "R1"), ("mAP", "mAP", "mAP"), ("mINP", "mINP", "mINP"))
_TASK = ("image-feature-extraction", "Person re-identification")


def _canonical(name: str) -> str:
    try:
        return canonical_dataset_name(name)
    except ValueError:
        return name


def card_metrics(metrics: Mapping | None) -> dict[str, float]:
    """R1 / mAP / mINP of a metrics mapping, as fractions, with what is missing left out.

    Accepts the trainer's keys (``eval_R1``, ``eval_mAP``, ``eval_mINP``) or bare ones (``R1``,
    ``mAP``, ``mINP``). None and NaN are left out (a metric that does not exist is not
    written); a value outside [0, 1] raises ``SureidError`` (percentages passed as fractions).

    Args:
        metrics (`Mapping` or `None`): name -> value, fractions as ``evaluate_reid`` gives them.

    Example:

    ```python
    >>> from sureid.model_card import card_metrics
    >>> card_metrics({"eval_R1": 0.5, "eval_mAP": 0.25, "eval_mINP": float("nan"), "epoch": 3})
    {'R1': 0.5, 'mAP': 0.25}
    ```
    """
    out: dict[str, float] = {}
    for key, _, _ in _METRICS:
        value = None
        for name in (key, f"eval_{key}"):
            if metrics and metrics.get(name) is not None:
                value = metrics[name]
                break
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError) as err:
            raise SureidError(f"metric {key} must be a number, got {value!r}") from err
        if math.isnan(value):
            continue
        if not 0.0 <= value <= 1.0:
            raise SureidError(
                f"metric {key} = {value} is not a fraction in [0, 1]; pass the metrics as "
                "evaluate_reid / SureidTrainer.evaluate return them (0.5 for 50%)"
            )
        out[key] = value
    return out


def timm_hub_id(name: str) -> str | None:
    """The Hub repo of timm's default pretrained weights of ``name`` (no network), or None.

    ``"vit_base_patch16_224"`` -> ``"timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"``: what
    ``SureidTeacherModel.from_timm`` downloads, so a card's ``base_model``.
    """
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # timm raises several types for unknown names
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    return hub_id or None


def hub_base_model(name_or_path: str | None) -> str | None:
    """``name_or_path`` as a ``base_model``: a Hub repo id (or a published zoo id's repo), else
    None (a local folder is no Hub model)."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    if Path(text).expanduser().exists():
        return None
    if "/" not in text:
        from .zoo import ZOO

        entry = ZOO.get(text)
        return entry.repo_id if entry is not None and entry.status == "published" else None
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text
    return None


def _eval_results(metrics: dict, dataset: str, protocol: str | None):
    from huggingface_hub import EvalResult

    task_type, task_name = _TASK
    results = []
    for key, metric_type, display in _METRICS:
        if key not in metrics:
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=_canonical(dataset),
                dataset_name=dataset_title(dataset),
                dataset_split="query+gallery",
                metric_type=metric_type,
                metric_name=display,
                metric_value=round(100.0 * metrics[key], 2),
                metric_config=protocol,
                metric_args={"protocol": protocol} if protocol else None,
            )
        )
    return results


def _describe(config) -> str:
    kind = "student" if config.model_type == "sureid-student" else "teacher"
    h, w = config.image_size
    text = (
        f"A SUREID {kind}: a ViT encoder (hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} blocks, {config.num_attention_heads} heads"
        + (", class + distillation token" if config.num_prefix_tokens == 2 else "")
        + f") on {h}x{w} images with {config.patch_size}-pixel patches at stride "
        f"{config.stride_size} ({config.num_patches} image tokens), and a BNNeck head"
    )
    if config.num_identities:
        text += f" (identity classifier over {config.num_identities} training identities)"
    text += ". The embedding for retrieval is the " + (
        "BNNeck output" if config.neck_feat == "after" else "class token before the BNNeck"
    )
    text += f" ({config.hidden_size} numbers per image, L2-normalised by `extract_features`)."
    if kind == "student" and config.hts_enabled:
        text += (
            " Hierarchical token sparsification (HTS): a token predictor before blocks "
            + ", ".join(str(i + 1) for i in config.sparsify_layers)
            + f" keeps {config.keep_rate:g} of the tokens it receives; in eval mode the other "
            "tokens leave the tensor, so the later blocks compute on fewer tokens."
        )
    elif kind == "student":
        text += " Dense: no token is dropped (keep rate 1)."
    else:
        text += " Dense: every block sees every token."
    return text


def _tokens(config) -> str:
    n = config.num_patches
    if config.model_type == "sureid-student" and config.hts_enabled:
        stages = " -> ".join(
            f"{k} (before block {i + 1})"
            for i, k in zip(config.sparsify_layers, config.stage_keep_counts)
        )
        return f"Image tokens kept per stage (eval mode): {n} -> {stages}."
    return f"Image tokens: all {n} in every block (no pruning)."


def _speed(speed: Mapping | None) -> list[str]:
    if not speed:
        return [
            "Not measured for these weights. `sureid benchmark` measures the architecture's "
            "throughput at each keep rate against a dense model on your device.",
        ]
    lines = ["| measured | value |", "|---|---|"]
    if speed.get("images_per_second") is not None:
        lines.append(f"| images/s | {speed['images_per_second']:.0f} |")
    if speed.get("speedup") is not None:
        ref = speed.get("reference") or "the reference"
        lines.append(f"| speed-up over {ref} | {speed['speedup']:.2f}x |")
    if speed.get("setting"):
        lines.append(f"| setting | {speed['setting']} |")
    return lines


def _limits(config, dataset, test_dataset, metrics, protocol, extra) -> list[str]:
    limits = []
    if metrics:
        limits.append(
            f"The metrics are one evaluation of these weights on the {dataset_title(test_dataset)}"
            f" query / gallery split under the `{protocol}` protocol; other cameras, data or "
            "image sizes will give other numbers."
        )
    else:
        limits.append("No evaluation of these weights was recorded, so the card states no metrics.")
    if dataset:
        limits.append(
            f"Trained on {dataset_title(dataset)} only: a ReID model carries its training set's "
            "cameras, clothing and viewpoints."
        )
    canon = {_canonical(d) for d in (dataset, test_dataset) if d}
    if "synthetic" in canon:
        limits.append(
            "The synthetic set is drawn people with drawn occluders: numbers on it say nothing "
            "about real benchmarks."
        )
    if canon & {"dukemtmc", "occluded_duke"}:
        limits.append(
            "DukeMTMC-reID (and Occluded-Duke, built from it) was withdrawn by its authors in "
            "2019: use these weights only where its licence allows."
        )
    if config.model_type == "sureid-teacher":
        limits.append(
            "Teachers are trained with the plain batch-hard triplet loss, not the paper's "
            "camera-constrained one (not implemented)."
        )
    if config.model_type == "sureid-student" and config.hts_enabled:
        limits.append(
            "The keep rate is fixed in the config: every image keeps the same number of tokens, "
            "occluded or not; the speed-up depends on the device and batch size."
        )
    limits.extend(extra)
    limits.append(
        "Person re-identification can follow people across cameras: use it only where the law "
        "and the data's licences allow, and with the consent it requires."
    )
    return limits


def build_model_card(
    model,
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    test_dataset: str | None = None,
    metrics: Mapping | None = None,
    protocol: str | None = None,
    base_model: str | None = None,
    started_from: str | None = None,
    teacher: str | None = None,
    training: Mapping | None = None,
    command: str | None = None,
    speed: Mapping | None = None,
    load_id: str | None = None,
    limits: Sequence[str] = (),
    license: str = LICENSE,
    tags: Sequence[str] = (),
):
    """The model card of a SUREID checkpoint, as a ``huggingface_hub.ModelCard``.

    Args:
        model: a SUREID teacher or student (or its config).
        model_name (`str`, *optional*): the model-index name; default ``sureid-student`` /
            ``sureid-teacher``.
        dataset (`str`, *optional*): the training set's name (``--dataset``).
        test_dataset (`str`, *optional*): the evaluation set's name; default ``dataset``.
        metrics (`Mapping`, *optional*): R1 / mAP / mINP of an evaluation of these weights, as
            fractions (``card_metrics``); None: no ``model-index``, and the card says so.
        protocol (`str`, *optional*): the evaluation protocol (``"market"`` / ``"cross"``);
            default: the test set's.
        base_model (`str`, *optional*): the Hub repo the weights started from (timm's ImageNet
            weights, or another checkpoint); local starts go in ``started_from``.
        started_from (`str`, *optional*): where the weights came from, in words.
        teacher (`str`, *optional*): the NPKD teacher (path, repo id or words).
        training (`Mapping`, *optional*): the training arguments, name -> value.
        command (`str`, *optional*): the command that trained the model.
        speed (`Mapping`, *optional*): measured ``images_per_second``, ``speedup``,
            ``reference`` and ``setting``; None: "not measured".
        load_id (`str`, *optional*): what the usage snippet passes to ``from_pretrained``.
        limits (`Sequence[str]`, *optional*): limits beyond the standard ones.
        license (`str`, *optional*, defaults to `"apache-2.0"`): the card's licence.
        tags (`Sequence[str]`, *optional*): tags beyond ``TAGS``.

    Example:

    ```python
    >>> from sureid import SureidStudentConfig
    >>> from sureid.model_card import build_model_card
    >>> card = build_model_card(SureidStudentConfig(), dataset="occluded_duke",
    ...                         metrics={"R1": 0.5, "mAP": 0.4, "mINP": 0.2})
    >>> card.data.eval_results[0].metric_value, card.data.eval_results[0].metric_config
    (50.0, 'market')
    ```
    """
    from huggingface_hub import ModelCard

    config = getattr(model, "config", model)
    kind = "student" if config.model_type == "sureid-student" else "teacher"
    model_name = model_name or f"sureid-{kind}"
    test_dataset = test_dataset or dataset
    found = card_metrics(metrics)
    if found:
        protocol = _metrics_protocol(test_dataset, protocol)
    data = _card_data(
        model_name,
        dataset,
        test_dataset,
        found,
        protocol,
        base_model=base_model,
        license=license,
        tags=tags,
    )
    body = [
        *_intro_section(model_name, config, dataset, test_dataset),
        *_results_section(found, test_dataset, protocol),
        *_usage_section(config, load_id),
        *_tokens_section(config, speed),
        *_training_section(started_from or base_model, teacher, command, training),
        "## Limits",
        "",
        *(
            f"- {line}"
            for line in _limits(config, dataset, test_dataset, found, protocol, list(limits))
        ),
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _metrics_protocol(test_dataset: str | None, protocol: str | None) -> str:
    """The protocol of metrics measured on ``test_dataset``: ``protocol``, else the data set's."""
    if test_dataset is None:
        raise SureidError(
            "metrics need the data set they were measured on: pass test_dataset (or dataset)"
        )
    if protocol is not None:
        return protocol
    from .evaluation import protocol_for_dataset

    return protocol_for_dataset(test_dataset)


def _card_data(
    model_name: str,
    dataset: str | None,
    test_dataset: str | None,
    found: dict[str, float],
    protocol: str | None,
    *,
    base_model: str | None,
    license: str,
    tags: Sequence[str],
):
    """The card's metadata block (a ``ModelCardData``): ``model-index`` only with metrics."""
    from huggingface_hub import ModelCardData

    datasets = []
    for name in (dataset, test_dataset):
        if name and _canonical(name) not in datasets:
            datasets.append(_canonical(name))
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        tags=list(TAGS) + [t for t in tags if t not in TAGS],
        datasets=datasets or None,
        base_model=base_model,
        pipeline_tag=PIPELINE_TAG,
        model_name=model_name,
        eval_results=_eval_results(found, test_dataset, protocol) if found else None,
    )


def _intro_section(model_name: str, config, dataset, test_dataset) -> list[str]:
    """The title, what the model is, and where it was trained (and evaluated)."""
    lines = [f"# {model_name}", "", _describe(config)]
    if dataset:
        where = f"Trained on {dataset_title(dataset)}"
        if test_dataset and _canonical(test_dataset) != _canonical(dataset):
            where += f", evaluated on {dataset_title(test_dataset)} (cross-domain)"
        lines += ["", where + "."]
    return lines + [""]


def _results_section(found: dict[str, float], test_dataset, protocol) -> list[str]:
    """``## Results``: a table of the metrics in %, or a line saying there are none."""
    lines = ["## Results", ""]
    if not found:
        return lines + [
            "No evaluation of these weights was recorded: this card states no metrics.",
            "",
        ]
    return lines + [
        f"Last evaluation of these weights on {dataset_title(test_dataset)} (protocol "
        f"`{protocol}`, students in eval mode: true token dropping):",
        "",
        "| " + " | ".join(d for k, _, d in _METRICS if k in found) + " |",
        "|" + "---|" * len(found),
        "| " + " | ".join(f"{100 * found[k]:.1f}" for k, _, _ in _METRICS if k in found) + " |",
        "",
    ]


def _usage_section(config, load_id: str | None) -> list[str]:
    """``## Usage``: loading the weights and extracting features, as a Python snippet."""
    load = load_id or "path/to/this/folder"
    return [
        "## Usage",
        "",
        "```python",
        "from sureid import SureidModel, extract_features",
        "",
        f'model = SureidModel.from_pretrained("{load}")',
        'features = extract_features(model, ["person1.jpg", "person2.jpg"])  '
        f"# [2, {config.hidden_size}], L2-normalised",
        "similarity = features @ features.T  # cosine similarity",
        "```",
        "",
    ]


def _tokens_section(config, speed: Mapping | None) -> list[str]:
    """``## Tokens and speed``: the tokens kept per stage and the measured speed (if any)."""
    return ["## Tokens and speed", "", _tokens(config), "", *_speed(speed), ""]


def _training_section(
    started_from: str | None, teacher: str | None, command: str | None, training: Mapping | None
) -> list[str]:
    """``## Training``: the starting weights, the teacher, the command and its arguments."""
    lines = ["## Training", ""]
    if started_from:
        lines += [f"Started from: {started_from}.", ""]
    lines += [f"Teacher (NPKD): {teacher}." if teacher else "Teacher: none (no distillation).", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    if training:
        lines += ["| argument | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in training.items()]
        lines.append("")
    return lines


def _cell(value) -> str:
    from enum import Enum

    if isinstance(value, Enum):  # transformers' OptimizerNames, SchedulerType, ...
        value = value.value
    text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def write_model_card(save_directory, card) -> Path:
    """Write ``card`` (a ``ModelCard``) as ``README.md`` in ``save_directory``; returns the path."""
    path = Path(save_directory) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(str(path))
    return path


def write_default_card(model, save_directory) -> Path | None:
    """A card without metrics for ``model``, only when ``save_directory`` has no ``README.md``.

    What ``save_pretrained`` calls: an existing card (the trainer's, the demo's, yours) is kept
    as it is. Returns the path written, or None when a card was already there.
    """
    path = Path(save_directory) / CARD_FILE
    if path.exists():
        return None
    return write_model_card(save_directory, build_model_card(model, load_id=str(save_directory)))
