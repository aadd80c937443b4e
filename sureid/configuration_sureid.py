"""Configurations of the SUREID teacher (dense ViT) and student (ViT/DeiT with HTS).

Both are `transformers` configs with their own ``model_type`` so ``AutoConfig`` and
``AutoModel`` resolve a checkpoint directory to the right class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import AutoConfig, PreTrainedConfig

from .errors import SureidError  # noqa: F401  (re-exported: every module imports it from here)

# ImageNet normalisation: the one definition (the data layer's transforms and the image processor
# import it from here).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How the student's training decisions are sampled: "gumbel" (the default) is the paper's
# per-token hard Gumbel-softmax whose kept share the ratio loss steers; "gumbel-topk" keeps
# exactly the stage's k tokens, as inference does (an option beyond the paper; docs/method.md).
HTS_SAMPLINGS = ("gumbel", "gumbel-topk")


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be an int or a pair of ints (height, width), got {value!r}"
        ) from err
    if len(pair) != 2:
        raise ValueError(f"{name} must be a pair (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def _check_positive(config, name: str, why: str) -> None:
    """``config.<name>`` must be a finite number > 0 (NaN fails every comparison, so say it)."""
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 ({why}), got {value}")


def _number(value, name: str, kind: type = float):
    """``kind(value)`` for the config field ``name`` (``kind`` is ``int`` or ``float``); a value
    that is no number (``"keep_rate": "high"`` in a config.json) raises a ValueError naming the
    field and the value, where Python's own error names neither."""
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {value!r}") from err


def _numbers(values, name: str, kind: type = float) -> list:
    """A list field of numbers (``image_mean``, ``sparsify_layers``), each checked as ``_number``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{name} must be a list of {what}, got {values!r}")
    return [_number(v, f"{name}[{i}]", kind) for i, v in enumerate(values)]


def _flag(value, name: str) -> bool:
    """A boolean field: ``bool("false")`` is True, so a string is refused, naming the field."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


# config.json keys that transformers itself reads or writes (``PreTrainedConfig``'s fields and
# arguments, those older versions wrote, the generation settings it drops on load): never
# reported as unknown. Keys starting with "_" are transformers' internal ones.
_TRANSFORMERS_KEYS = frozenset(
    {
        "add_cross_attention",
        "architectures",
        "attn_implementation",
        "auto_map",
        "bos_token_id",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "dtype",
        "eos_token_id",
        "experts_implementation",
        "finetuning_task",
        "id2label",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "model_type",
        "name_or_path",
        "num_labels",
        "output_attentions",
        "output_hidden_states",
        "pad_token_id",
        "per_layer_config",
        "prefix",
        "problem_type",
        "pruned_heads",
        "return_dict",
        "sep_token_id",
        "task_specific_params",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tie_last_hidden_states",
        "tie_word_embeddings",
        "tokenizer_class",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "transformers_weights",
        "use_bfloat16",
    }
)


def _known_to_transformers(key: str) -> bool:
    if key.startswith("_") or key in _TRANSFORMERS_KEYS or hasattr(PreTrainedConfig, key):
        return True
    try:
        from transformers import GenerationConfig

        return key in GenerationConfig._get_default_generation_params()
    except (ImportError, AttributeError):
        return False


def _config_fields(cls) -> list[str]:
    """The fields of a SUREID config class: the arguments of its ``__init__`` and its bases'."""
    import inspect

    names = set()
    for klass in cls.__mro__:
        if klass is PreTrainedConfig:
            break
        if "__init__" in vars(klass):
            for parameter in inspect.signature(klass.__init__).parameters.values():
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                    names.add(parameter.name)
    names.discard("self")
    return sorted(names)


def _warn_unknown_fields(cls, extra: dict, source: str | None) -> None:
    """Warn about each key of ``extra`` (what the config's arguments did not take) that neither
    SUREID nor transformers knows: a misspelt field would otherwise be ignored in silence and
    its default used. The warning names the file (when loading one) and the closest field."""
    unknown = [key for key in extra if not _known_to_transformers(key)]
    if not unknown:
        return
    import difflib
    import warnings

    fields = _config_fields(cls)
    where = source or cls.__name__
    for key in unknown:
        value = repr(extra[key])
        value = value if len(value) <= 40 else value[:37] + "..."
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}? (that field keeps its default)"
            if close
            else f"{cls.__name__}'s fields are {', '.join(fields)}"
        )
        warnings.warn(
            f"{where}: unknown config field {key!r} (= {value}) is ignored; {hint}",
            UserWarning,
            stacklevel=4,
        )


def _describe_source(name, subfolder: str = "") -> str:
    """The config.json that ``name`` (a folder, a file or a Hub repo id) loads, in words."""
    from pathlib import Path

    path = Path(str(name)).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        return str(path / subfolder / "config.json")
    inside = f"{subfolder}/config.json" if subfolder else "config.json"
    return f"{inside} of {name} (Hugging Face Hub)"


class SureidConfig(PreTrainedConfig):
    """Fields shared by teacher and student: the ViT encoder and the BNNeck head.

    The defaults describe DeiT-S at 256x128 (the student's backbone); the teacher and student
    configs below set their own widths. Values are checked at construction: a wrong one raises a
    ``ValueError`` that names the field.

    Args:
        image_size (`int` or `tuple[int, int]`, *optional*, defaults to `(256, 128)`):
            Input (height, width) in pixels, both even; an int means a square.
        patch_size (`int`, *optional*, defaults to `16`):
            Side of the square patches of the patch embedding.
        stride_size (`int`, *optional*, defaults to `16`):
            Step between patches; below ``patch_size`` it gives TransReID's overlapping patches
            (12 at 256x128: a 21x10 grid instead of 16x8).
        num_channels (`int`, *optional*, defaults to `3`):
            Channels of the input images.
        hidden_size (`int`, *optional*, defaults to `384`):
            Width C of the tokens (384 = DeiT-S, 768 = ViT-B).
        num_hidden_layers (`int`, *optional*, defaults to `12`):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to `6`):
            Attention heads per block; must divide ``hidden_size``.
        mlp_ratio (`float`, *optional*, defaults to `4.0`):
            MLP width over ``hidden_size``.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query / key / value projection has a bias.
        drop_path_rate (`float`, *optional*, defaults to `0.1`):
            Stochastic depth: the drop probability of the last block (linear from 0), in [0, 1).
        layer_norm_eps (`float`, *optional*, defaults to `1e-6`):
            Epsilon of the LayerNorms.
        num_prefix_tokens (`int`, *optional*, defaults to `1`):
            1 (class token) or 2 (class + distillation token of distilled DeiT checkpoints).
        num_identities (`int`, *optional*, defaults to `0`):
            Identities of the BNNeck classifier (the training set's); 0 = no classifier (a
            feature extractor only).
        neck (`str`, *optional*, defaults to `"bnneck"`):
            ``"bnneck"`` (BatchNorm before the classifier, as in BoT) or ``"none"``.
        neck_feat (`str`, *optional*, defaults to `"after"`):
            The embedding returned at inference: the feature ``"after"`` the BNNeck's BatchNorm
            or ``"before"`` it.
        image_mean (`Sequence[float]`, *optional*, defaults to `IMAGENET_MEAN`):
            Per-channel mean the image processor subtracts (one value per channel).
        image_std (`Sequence[float]`, *optional*, defaults to `IMAGENET_STD`):
            Per-channel standard deviation the image processor divides by (positive).
        initializer_range (`float`, *optional*, defaults to `0.02`):
            Standard deviation of the truncated normal initialisation of new weights.
        kwargs:
            Passed to ``transformers.PreTrainedConfig``.

    Example:

    ```python
    >>> from sureid import SureidConfig
    >>> config = SureidConfig(stride_size=12)  # overlapping patches
    >>> config.grid_size, config.num_patches
    ((21, 10), 210)
    ```
    """

    model_type = "sureid"

    def __init__(
        self,
        image_size: Sequence[int] | int = (256, 128),
        patch_size: int = 16,
        stride_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-6,
        num_prefix_tokens: int = 1,
        num_identities: int = 0,
        neck: str = "bnneck",
        neck_feat: str = "after",
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = list(_pair(image_size, "image_size"))
        self.patch_size = _number(patch_size, "patch_size", int)
        self.stride_size = _number(stride_size, "stride_size", int)
        self.num_channels = _number(num_channels, "num_channels", int)
        self.hidden_size = _number(hidden_size, "hidden_size", int)
        self.num_hidden_layers = _number(num_hidden_layers, "num_hidden_layers", int)
        self.num_attention_heads = _number(num_attention_heads, "num_attention_heads", int)
        self.mlp_ratio = _number(mlp_ratio, "mlp_ratio")
        self.qkv_bias = _flag(qkv_bias, "qkv_bias")
        self.drop_path_rate = _number(drop_path_rate, "drop_path_rate")
        self.layer_norm_eps = _number(layer_norm_eps, "layer_norm_eps")
        self.num_prefix_tokens = _number(num_prefix_tokens, "num_prefix_tokens", int)
        self.num_identities = _number(num_identities, "num_identities", int)
        self.neck = neck
        self.neck_feat = neck_feat
        self.image_mean = _numbers(image_mean, "image_mean")
        self.image_std = _numbers(image_std, "image_std")
        self.initializer_range = _number(initializer_range, "initializer_range")
        # ``from_dict`` names the config.json being loaded (for the warning below and errors)
        source = kwargs.pop("_sureid_source", None)
        _warn_unknown_fields(type(self), kwargs, source)
        super().__init__(**kwargs)
        self._validate_shared()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedConfig.from_pretrained`` that names the config.json it reads in its
        errors (a value that is not valid) and warnings (a field it does not know)."""
        kwargs.setdefault(
            "_sureid_source",
            _describe_source(pretrained_model_name_or_path, kwargs.get("subfolder") or ""),
        )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """``PreTrainedConfig.from_dict``; when the dict comes from a file (``from_pretrained``,
        ``AutoConfig``), a bad value raises a ``SureidError`` that names that file."""
        source = kwargs.pop("_sureid_source", None)
        if source is None and kwargs.get("name_or_path"):
            source = _describe_source(kwargs["name_or_path"])
        if source is not None:
            config_dict = {**config_dict, "_sureid_source": source}
        try:
            return super().from_dict(config_dict, **kwargs)
        except SureidError:
            raise
        except ValueError as err:
            if source is None:
                raise
            raise SureidError(f"{source}: {err}; correct it in that file") from err

    # -- derived geometry -------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) for ``image_size`` with ``patch_size`` / ``stride_size``."""
        h, w = self.image_size
        return (
            (h - self.patch_size) // self.stride_size + 1,
            (w - self.patch_size) // self.stride_size + 1,
        )

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def _validate_shared(self) -> None:
        h, w = self.image_size
        for name, value in (("image_size[0] (height)", h), ("image_size[1] (width)", w)):
            if value <= 0 or value % 2:
                raise ValueError(f"{name} must be a positive even number of pixels, got {value}")
        if self.patch_size <= 0 or self.patch_size > min(h, w):
            raise ValueError(
                f"patch_size must be in 1..{min(h, w)} for image_size {h}x{w}, got {self.patch_size}"
            )
        if self.stride_size <= 0 or self.stride_size > self.patch_size:
            raise ValueError(
                f"stride_size must be in 1..patch_size ({self.patch_size}), got {self.stride_size}"
            )
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_prefix_tokens not in (1, 2):
            raise ValueError(
                f"num_prefix_tokens must be 1 (class token) or 2 (class + distillation token), "
                f"got {self.num_prefix_tokens}"
            )
        if self.num_identities < 0:
            raise ValueError(
                f"num_identities must be >= 0 (0 = no classifier), got {self.num_identities}"
            )
        if self.neck not in ("bnneck", "none"):
            raise ValueError(f"neck must be 'bnneck' or 'none', got {self.neck!r}")
        if self.neck_feat not in ("before", "after"):
            raise ValueError(
                f"neck_feat must be 'before' or 'after' (the BNNeck), got {self.neck_feat!r}"
            )
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(
                f"image_mean and image_std need {self.num_channels} values (num_channels), got "
                f"{len(self.image_mean)} and {len(self.image_std)}"
            )
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std values must be positive, got {self.image_std}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for name in ("image_mean", "image_std"):
            if not all(math.isfinite(v) for v in getattr(self, name)):
                raise ValueError(f"{name} values must be finite numbers, got {getattr(self, name)}")
        _check_positive(self, "mlp_ratio", "the MLP width is hidden_size x mlp_ratio; ViT uses 4")
        _check_positive(self, "layer_norm_eps", "added to the LayerNorm variance; ViT uses 1e-6")
        _check_positive(self, "initializer_range", "std of the weight init; ViT uses 0.02")


class SureidTeacherConfig(SureidConfig):
    """The dense ViT teacher (ViT-B/16 by default): :class:`SureidConfig` with ViT-B's widths.

    Args:
        hidden_size (`int`, *optional*, defaults to `768`):
            Width C of the tokens.
        num_hidden_layers (`int`, *optional*, defaults to `12`):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to `12`):
            Attention heads per block.
        kwargs:
            Any other field of :class:`SureidConfig` (image size, patches, head, ...).

    Example:

    ```python
    >>> from sureid import SureidTeacherConfig, SureidTeacherModel
    >>> config = SureidTeacherConfig(num_identities=702)  # Occluded-Duke's training identities
    >>> config.hidden_size, config.num_patches
    (768, 128)
    >>> model = SureidTeacherModel(config)  # random weights; SureidTeacherModel.from_timm for ImageNet's
    ```
    """

    model_type = "sureid-teacher"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        **kwargs,
    ):
        super().__init__(
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            **kwargs,
        )


class SureidStudentConfig(SureidConfig):
    """The HTS student (DeiT-S by default): :class:`SureidConfig` plus the token sparsification.

    A TokenPredictor runs before each block in ``sparsify_layers`` and keeps
    ``keep_rate ** (j + 1)`` of the image tokens at stage j (0-based), as integer counts
    (``stage_keep_counts``). See docs/method.md for the method and how this code reads it.

    Args:
        hidden_size (`int`, *optional*, defaults to `384`):
            Width C of the tokens.
        num_hidden_layers (`int`, *optional*, defaults to `12`):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to `6`):
            Attention heads per block.
        sparsify_layers (`Sequence[int]`, *optional*, defaults to `(3, 6, 9)`):
            0-based indices of the blocks a TokenPredictor runs before, strictly increasing, in
            ``1..num_hidden_layers - 1`` (3, 6, 9 are the paper's 4th, 7th and 10th layers).
        keep_rate (`float`, *optional*, defaults to `0.7`):
            p in (0, 1]: stage j keeps ``p ** (j + 1)`` of the image tokens; 1.0 turns the
            predictors off (the student is then a dense ViT).
        cls_reweight (`bool`, *optional*, defaults to `True`):
            Whether the class-token attention reweight (eq. 7-8) runs on the tokens entering the
            last block during training (never at inference).
        cls_reweight_init (`float`, *optional*, defaults to `0.5`):
            Initial value of the reweight's learnable lambda.
        gumbel_tau (`float`, *optional*, defaults to `1.0`):
            Temperature of the hard Gumbel-softmax keep/drop decisions in training (positive).
        hts_sampling (`str`, *optional*, defaults to `"gumbel"`):
            How training samples the keep decisions: `"gumbel"` is the paper's per-token hard
            Gumbel-softmax whose kept share the ratio loss steers; `"gumbel-topk"` keeps exactly
            each stage's k tokens (Gumbel-top-k, straight-through gradient), as inference does,
            so the ratio loss is always 0 (docs/method.md compares them).
        kwargs:
            Any other field of :class:`SureidConfig` (image size, patches, head, ...).

    Example:

    ```python
    >>> from sureid import SureidStudentConfig, SureidStudentModel
    >>> config = SureidStudentConfig(keep_rate=0.7)
    >>> config.stage_keep_counts  # of 128 image tokens at 256x128, patch 16
    [90, 63, 44]
    >>> model = SureidStudentModel(config).eval()  # eval mode: the dropped tokens are gone
    ```
    """

    model_type = "sureid-student"

    def __init__(
        self,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        sparsify_layers: Sequence[int] = (3, 6, 9),
        keep_rate: float = 0.7,
        cls_reweight: bool = True,
        cls_reweight_init: float = 0.5,
        gumbel_tau: float = 1.0,
        hts_sampling: str = "gumbel",
        **kwargs,
    ):
        self.sparsify_layers = _numbers(sparsify_layers, "sparsify_layers", int)
        self.keep_rate = _number(keep_rate, "keep_rate")
        self.cls_reweight = _flag(cls_reweight, "cls_reweight")
        self.cls_reweight_init = _number(cls_reweight_init, "cls_reweight_init")
        self.gumbel_tau = _number(gumbel_tau, "gumbel_tau")
        self.hts_sampling = hts_sampling
        super().__init__(
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            **kwargs,
        )
        self._validate_student()

    def _validate_student(self) -> None:
        if not (0.0 < self.keep_rate <= 1.0) or math.isnan(self.keep_rate):
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        layers = self.sparsify_layers
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"sparsify_layers must be strictly increasing, got {layers}")
        if layers and (layers[0] < 1 or layers[-1] >= self.num_hidden_layers):
            raise ValueError(
                f"sparsify_layers must lie in 1..{self.num_hidden_layers - 1} (0-based block indices "
                f"before which tokens are pruned; num_hidden_layers={self.num_hidden_layers}), got {layers}"
            )
        _check_positive(self, "gumbel_tau", "the Gumbel-softmax temperature; 1 by default")
        if not math.isfinite(self.cls_reweight_init):
            raise ValueError(
                f"cls_reweight_init must be a finite number (the initial lambda of the class-token "
                f"reweight; 0.5 by default), got {self.cls_reweight_init}"
            )
        if self.hts_sampling not in HTS_SAMPLINGS:
            raise ValueError(
                f"hts_sampling must be one of {HTS_SAMPLINGS}, got {self.hts_sampling!r}"
            )

    @property
    def hts_enabled(self) -> bool:
        """Whether token sparsification runs at all (keep_rate < 1 and at least one stage)."""
        return self.keep_rate < 1.0 and len(self.sparsify_layers) > 0

    @property
    def stage_keep_ratios(self) -> list[float]:
        """Target kept fraction of the image tokens after stage j (0-based): ``p^(j+1)``, i.e.
        p, p^2, p^3, ..."""
        return [self.keep_rate ** (j + 1) for j in range(len(self.sparsify_layers))]

    @property
    def stage_keep_counts(self) -> list[int]:
        """Image tokens kept after stage j (0-based): ``floor(N * p^(j+1) + 0.5)`` (round half up),
        at least 1 and at most N.

        Computed once from the config, so training targets, inference top-k and the FLOPs bound all
        use the same integers.
        """
        n = self.num_patches
        return [max(1, min(n, math.floor(n * r + 0.5))) for r in self.stage_keep_ratios]

    def tokens_per_block(self) -> list[int]:
        """Tokens (prefix + image) each block computes on at inference, for FLOPs accounting."""
        counts, current = [], self.num_patches
        stages = dict(zip(self.sparsify_layers, self.stage_keep_counts)) if self.hts_enabled else {}
        for i in range(self.num_hidden_layers):
            current = stages.get(i, current)
            counts.append(current + self.num_prefix_tokens)
        return counts


# Known to transformers' AutoConfig as soon as the classes exist: loading a checkpoint by path
# reads its config.json through AutoConfig.
for _config_cls in (SureidTeacherConfig, SureidStudentConfig):
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
