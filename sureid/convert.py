"""Import ImageNet ViT/DeiT weights (timm models or checkpoints) into SUREID models.

Parameter names of the SUREID encoder follow timm's ``VisionTransformer``, so the import is a
prefix rename, a resample of the position embedding from the ImageNet grid (14x14) to the ReID
grid (e.g. 16x8) with ``timm.layers.resample_abs_pos_embed``, and dropping the classifier heads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .configuration_sureid import SureidConfig, SureidError

# Keys of timm ViT/DeiT checkpoints that SUREID does not use (ImageNet classifier heads).
_DROPPED_PREFIXES = ("head.", "head_dist.", "pre_logits.", "fc_norm.")
# Keys of a SUREID model that an ImageNet checkpoint cannot provide.
_NEW_PREFIXES = ("predictors.", "head.", "cls_reweight_lambda")


def _timm_skeleton(name: str) -> nn.Module:
    """The timm architecture for ``name`` without weights (meta device: no memory, no network)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise SureidError(
            f"timm does not know the model {name!r}; use a ViT/DeiT name such as "
            "'deit_small_patch16_224', 'deit_small_distilled_patch16_224' or 'vit_base_patch16_224'"
        ) from err


def timm_architecture(model: nn.Module, name: str) -> dict:
    """Config fields read off a timm VisionTransformer; unsupported variants raise."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "cls_token"):
        raise SureidError(f"{name!r} is not a timm ViT/DeiT VisionTransformer with a class token")
    block = blocks[0]
    unsupported = []
    if getattr(model, "no_embed_class", False):
        unsupported.append("no_embed_class")
    if getattr(model, "reg_token", None) is not None:
        unsupported.append("register tokens")
    if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
        unsupported.append("layer scale")
    if not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity):
        unsupported.append("qk-norm")
    if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
        unsupported.append("pre-norm")
    if not isinstance(getattr(model, "norm", None), nn.LayerNorm):
        unsupported.append("a final norm other than LayerNorm")
    if unsupported:
        raise SureidError(
            f"{name!r} uses {', '.join(unsupported)}, which SUREID's encoder does not"
        )
    embed_dim = model.embed_dim
    return {
        "hidden_size": embed_dim,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "layer_norm_eps": model.norm.eps,
        "num_prefix_tokens": model.num_prefix_tokens,
        "patch_size": model.patch_embed.patch_size[0],
        "stride_size": model.patch_embed.patch_size[0],
        "num_channels": model.patch_embed.proj.in_channels,
    }


def config_from_timm_name(name: str, config_cls: type[SureidConfig], **overrides) -> SureidConfig:
    """A SUREID config with the architecture of timm's ``name``; ``overrides`` win (e.g. keep_rate)."""
    fields = timm_architecture(_timm_skeleton(name), name)
    fields.update(overrides)
    return config_cls(**fields)


def _read_checkpoint(checkpoint) -> dict[str, torch.Tensor]:
    """A state dict from a timm model, a state dict, or a .pth/.bin/.safetensors path."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, str | os.PathLike):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist (expected a .pth or .safetensors file)"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SureidError(
                f"could not read {path} as a PyTorch checkpoint with weights_only=True ({err}); "
                "convert it to .safetensors or re-save its state_dict"
            ) from err
        checkpoint = state
    if not isinstance(checkpoint, Mapping):
        raise SureidError(
            f"checkpoint must be a timm model, a state dict or a file path, got {type(checkpoint).__name__}"
        )
    for key in ("model", "state_dict", "model_ema"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and not any(
            isinstance(v, torch.Tensor) for v in checkpoint.values()
        ):
            checkpoint = inner
            break
    return {
        k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)
    }


def _source_grid(checkpoint, num_tokens: int, num_prefix: int) -> tuple[int, int]:
    """The patch grid the checkpoint's position embedding was trained at."""
    grid = getattr(getattr(checkpoint, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return tuple(grid)
    side = int(round((num_tokens - num_prefix) ** 0.5))
    if side * side != num_tokens - num_prefix:
        raise SureidError(
            f"cannot infer the position-embedding grid of a checkpoint with {num_tokens - num_prefix} "
            "patch positions (not square); pass the timm model itself instead of its state dict"
        )
    return (side, side)


def load_timm_state_dict(model: nn.Module, name: str, checkpoint=None) -> None:
    """Copy ImageNet ViT/DeiT weights into ``model.encoder`` in place.

    ``checkpoint`` None asks timm for its pretrained weights of ``name`` (a network download).
    Anything the checkpoint has that the model lacks, or the reverse beyond the new SUREID parts
    (predictors, BNNeck head, reweight lambda), raises ``SureidError`` naming the tensors.
    """
    if checkpoint is None:
        checkpoint = _download_timm_weights(name)
    mapped = {
        f"encoder.{key}": value
        for key, value in _read_checkpoint(checkpoint).items()
        if not key.startswith(_DROPPED_PREFIXES)
    }
    _fit_pos_embed(mapped, checkpoint, model.config, name)
    own = model.state_dict()
    _check_fit(mapped, own, model.config, name)
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value)


def _download_timm_weights(name: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True)
    except OSError as err:  # offline, nothing cached, or the Hub unreachable
        raise OSError(
            f"cannot download timm's pretrained weights of {name!r} ({err}); offline, pass "
            "a local .pth or .safetensors of those weights as checkpoint=..."
        ) from err


def _fit_pos_embed(mapped: dict, checkpoint, config: SureidConfig, name: str) -> None:
    """Resample the checkpoint's position embedding (bicubic) to the model's patch grid, in
    ``mapped``, when the token counts differ (another input size or stride)."""
    from timm.layers import resample_abs_pos_embed

    pos_key = "encoder.pos_embed"
    if pos_key not in mapped:
        raise SureidError(f"checkpoint for {name!r} has no pos_embed; is it a ViT/DeiT checkpoint?")
    pos = mapped[pos_key]
    prefix = config.num_prefix_tokens
    if pos.shape[1] != prefix + config.num_patches:
        old_grid = _source_grid(checkpoint, pos.shape[1], prefix)
        mapped[pos_key] = resample_abs_pos_embed(
            pos.float(),
            new_size=list(config.grid_size),
            old_size=list(old_grid),
            num_prefix_tokens=prefix,
            interpolation="bicubic",
            antialias=True,
        ).to(pos.dtype)


def _check_fit(mapped: dict, own: dict, config: SureidConfig, name: str) -> None:
    """Raise naming every tensor that does not fit: shape mismatches, encoder tensors the
    checkpoint lacks (SUREID's new parts excepted), and checkpoint tensors the model lacks."""
    unexpected = sorted(k for k in mapped if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and own[k].shape != v.shape
    )
    missing = sorted(k for k in own if k not in mapped and not k.startswith(_NEW_PREFIXES))
    if not (unexpected or mismatched or missing):
        return
    parts = []
    if mismatched:
        parts.append("shape mismatch: " + "; ".join(mismatched))
    if missing:
        parts.append("missing from checkpoint: " + ", ".join(missing[:20]))
    if unexpected:
        parts.append("not in the SUREID model: " + ", ".join(unexpected[:20]))
    raise SureidError(
        f"checkpoint does not fit a SUREID model built from {name!r} "
        f"(hidden {config.hidden_size}, depth {config.num_hidden_layers}, "
        f"{config.num_prefix_tokens} prefix tokens): " + " | ".join(parts)
    )
