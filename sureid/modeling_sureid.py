"""The SUREID networks, read top to bottom.

A ViT encoder (timm-compatible parameter names, so ImageNet ViT/DeiT weights load by name), the
HTS TokenPredictor, the class-token attention reweight, the BNNeck head, and the three models:
``SureidTeacherModel`` (dense), ``SureidStudentModel`` (HTS) and ``SureidModel`` (loads either).

The student has two paths through the same weights:

* training: every token flows; hard Gumbel-softmax decisions update a running mask and the
  attention is masked per eq. (5)-(6) of the paper (a dropped token sees only itself, nobody
  sees it);
* inference: the top-k tokens by keep score are gathered at each stage and the rest leave the
  tensor, so every later block computes on fewer tokens (this is where the speed comes from).

Given the same decisions both paths give the same class token (``tests/test_modeling.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_sureid import (
    SureidConfig,
    SureidError,
    SureidStudentConfig,
    SureidTeacherConfig,
)

# Added to the denominators of the masked softmax and of the predictor's masked average, so an
# all-dropped row or stage stays finite (docs/method.md: eq. (1) and (6), `eps = 1e-6`).
_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


@dataclass
class SureidModelOutput(ModelOutput):
    """Output of the teacher and the student.

    features: class token after the final norm, before the BNNeck, [B, C].
    embeddings: the inference feature (before or after the BNNeck per ``neck_feat``), [B, C].
    logits: identity logits ``W * BN(features)`` when ``num_identities > 0``, [B, num_identities].
    loss: identity cross-entropy when ``labels`` are given (training losses live in ``losses``).
    keep_masks: student, training mode: the running mask after each stage, [B, N] floats in {0, 1}
        (straight-through gradients), one per stage.
    keep_probs: student, training mode: the predictor's keep probability per image token and stage.
    kept_indices: student, eval mode: indices into the patch grid (row-major) of the image tokens
        kept after each stage, [B, k_j], one per stage.
    """

    loss: torch.Tensor | None = None
    features: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    keep_masks: tuple[torch.Tensor, ...] | None = None
    keep_probs: tuple[torch.Tensor, ...] | None = None
    kept_indices: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------
# Encoder parts (parameter names follow timm's VisionTransformer)
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution (stride < patch: overlapping patches)."""

    def __init__(self, config: SureidConfig):
        super().__init__()
        self.image_size = tuple(config.image_size)
        self.grid_size = config.grid_size
        self.proj = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.stride_size,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        channels = self.proj.in_channels
        if (
            pixel_values.ndim != 4
            or pixel_values.shape[1] != channels
            or tuple(pixel_values.shape[-2:]) != self.image_size
        ):
            raise SureidError(
                f"expected pixel_values of shape [B, {channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}] ({channels} channels at the config's image_size), got "
                f"{list(pixel_values.shape)}; SureidImageProcessor resizes images and makes "
                "grayscale ones RGB"
            )
        if not pixel_values.is_floating_point():
            raise SureidError(
                f"pixel_values must be a float tensor of normalised pixels, got {pixel_values.dtype}; "
                "pass the images through SureidImageProcessor (or sureid.extract_features)"
            )
        # float64 (numpy's default) or another float type: compute in the weights' dtype
        pixel_values = pixel_values.to(self.proj.weight.dtype)
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def masked_softmax(scores: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Eq. (5)-(6): softmax over keys weighted by ``G_ij = 1 if i == j else policy_j``.

    ``scores`` [B, H, M, N] for the first ``M`` tokens' queries (``M = N``, or 1 when only the
    class token's row is needed), ``policy`` [B, N] in {0, 1} (differentiable). Computed in float32 with
    the row maximum over *allowed* keys subtracted (masked keys' exponents clamped at 0), so the
    result is finite for any input,
    also when every image token is dropped and under fp16/bf16 autocast. The multiplicative mask
    (not a fill with -inf) is what lets gradients reach the TokenPredictor through attention.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        m, n = scores.shape[-2], scores.shape[-1]
        eye = torch.eye(m, n, device=scores.device, dtype=torch.float32)
        keep = policy.float()[:, None, None, :]
        gate = keep + (1.0 - keep) * eye  # [B, 1, M, N]
        allowed = gate > 0
        row_max = scores.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True).detach()
        # clamp: a no-op on allowed keys (<= their max); keeps masked keys' exp finite (<= 1)
        weights = torch.exp((scores - row_max).clamp(max=0.0)) * gate
        return weights / (weights.sum(dim=-1, keepdim=True) + _EPS)


class Attention(nn.Module):
    """Multi-head self-attention: SDPA on the (possibly pruned) tokens, or masked per eq. (5)-(6)."""

    def __init__(self, config: SureidConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, config.hidden_size * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, policy: torch.Tensor | None = None, cls_only: bool = False
    ) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; with ``cls_only`` -> [B, 1, C], the class token's row alone.

        ``cls_only`` computes the query of the class token only (keys and values of every token):
        the same row 0 as the full computation, at about half of the attention's cost (the
        projection then runs on one token).
        """
        b, n, c = x.shape
        if cls_only:
            m = 1
            bias = self.qkv.bias
            q = F.linear(x[:, :1], self.qkv.weight[:c], None if bias is None else bias[:c])
            q = q.reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(x, self.qkv.weight[c:], None if bias is None else bias[c:])
            k, v = kv.reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            m = n
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if policy is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = masked_softmax((q * self.scale) @ k.transpose(-2, -1), policy)
            out = attn.to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, m, c))

    def cls_attention(
        self, x: torch.Tensor, num_prefix: int, policy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. (7): the class token's attention over the image tokens, averaged over heads.

        ``x`` is the block's normalised input [B, N, C]; returns [B, N - num_prefix]. Computes only
        the class token's query and the keys (no full attention matrix), so it costs little at
        inference. With ``policy`` dropped tokens get zero weight.
        """
        b, n, c = x.shape
        w_q, w_k, _ = self.qkv.weight.chunk(3, dim=0)
        b_q, b_k = (None, None) if self.qkv.bias is None else self.qkv.bias.chunk(3)[:2]
        q = (
            F.linear(x[:, :1], w_q, b_q)
            .reshape(b, 1, self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        k = F.linear(x, w_k, b_k).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = (q.float() * self.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N]
            if policy is None:
                attn = scores.softmax(dim=-1)
            else:
                # Row 0 of eq. (6): the class token sees itself and the kept tokens.
                attn = masked_softmax(scores, policy)
        return attn.mean(dim=1)[:, 0, num_prefix:]


class Block(nn.Module):
    """Pre-norm transformer block (timm names: norm1, attn, norm2, mlp)."""

    def __init__(self, config: SureidConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(
            in_features=config.hidden_size,
            hidden_features=int(config.hidden_size * config.mlp_ratio),
            act_layer=nn.GELU,
        )

    def forward(
        self, x: torch.Tensor, policy: torch.Tensor | None = None, cls_only: bool = False
    ) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; with ``cls_only`` -> [B, 1, C]: the class token's output only.

        The models run their last block with ``cls_only`` because only the class token is read
        after it: attention then computes one query row, and the projection and MLP one token.
        The class token comes out the same as from the full block (forward and backward).
        """
        # One expression per residual, so the attention output is freed right after the add.
        if cls_only:
            x = x[:, :1] + self.drop_path(self.attn(self.norm1(x), policy, cls_only=True))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x), policy))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TokenPredictor(nn.Module):
    """HTS keep/drop predictor, eq. (1), after DynamicViT.

    Each image token's feature is split into a local half and a global half; the global half is
    averaged over the currently kept tokens (mask-weighted, eps in the denominator) and appended
    to every token; an MLP maps the result to two logits (index 1 = keep).
    """

    def __init__(self, hidden_size: int, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.in_conv = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=layer_norm_eps),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
        )
        self.out_conv = nn.Sequential(
            nn.Linear(hidden_size, hidden_size // 2),
            nn.GELU(),
            nn.Linear(hidden_size // 2, hidden_size // 4),
            nn.GELU(),
            nn.Linear(hidden_size // 4, 2),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, C] image tokens, ``policy`` [B, N] running mask (None = all kept) -> [B, N, 2]."""
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local_x, global_x = x[..., :half], x[..., half:]
        if policy is None:
            global_x = global_x.sum(dim=1, keepdim=True) / (x.shape[1] + _EPS)
        else:
            p = policy.to(x.dtype).unsqueeze(-1)
            global_x = (global_x * p).sum(dim=1, keepdim=True) / (p.sum(dim=1, keepdim=True) + _EPS)
        x = torch.cat([local_x, global_x.expand(-1, x.shape[1], -1)], dim=-1)
        return self.out_conv(x)

    def keep_score(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: a score monotone in the keep probability (logit difference), [B, N].

        Computes ``forward(x)[..., 1] - forward(x)[..., 0]`` with only what the decision needs:
        the global half enters the first ``out_conv`` layer as one bias vector per image (not a
        concatenated copy per token), and the last layer collapses to the difference of its two
        rows. Equal to the logit difference up to float rounding; no softmax, no noise.
        """
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        fc1, act1, fc2, act2, fc3 = self.out_conv
        global_x = h[..., half:].sum(dim=1, keepdim=True) / (h.shape[1] + _EPS)  # [B, 1, C/2]
        image_bias = F.linear(global_x, fc1.weight[:, half:], fc1.bias)  # [B, 1, C/2]
        w_local = fc1.weight[:, :half].t().expand(h.shape[0], -1, -1)
        z = act1(torch.baddbmm(image_bias, h[..., :half], w_local))  # bias add fused in the GEMM
        z = act2(fc2(z))
        return z @ (fc3.weight[1] - fc3.weight[0]) + (fc3.bias[1] - fc3.bias[0])


class BNNeck(nn.Module):
    """BNNeck head: ``BN(f)`` (bias frozen at 0, as in BoT) and a bias-free identity classifier."""

    def __init__(self, config: SureidConfig):
        super().__init__()
        self.use_bn = config.neck == "bnneck"
        self.bottleneck = nn.BatchNorm1d(config.hidden_size)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = (
            nn.Linear(config.hidden_size, config.num_identities, bias=False)
            if config.num_identities > 0
            else None
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        neck = self.bottleneck(features) if self.use_bn else features
        logits = self.classifier(neck) if self.classifier is not None else None
        return neck, logits


class SureidEncoder(nn.Module):
    """Patch embedding, prefix tokens, learned position embedding, blocks and final norm."""

    def __init__(self, config: SureidConfig):
        super().__init__()
        c = config.hidden_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.dist_token = (
            nn.Parameter(torch.zeros(1, 1, c)) if config.num_prefix_tokens == 2 else None
        )
        self.pos_embed = nn.Parameter(
            torch.zeros(1, config.num_patches + config.num_prefix_tokens, c)
        )
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.blocks = nn.ModuleList(Block(config, r) for r in rates)
        self.norm = nn.LayerNorm(c, eps=config.layer_norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, x], dim=1) + self.pos_embed


# --------------------------------------------------------------------------------------------
# Pretrained-model plumbing
# --------------------------------------------------------------------------------------------


def _not_found(name, err: OSError) -> Exception:
    """The error for a checkpoint that does not load: it names the file at fault and the fix.

    A local folder is examined (no config.json, a truncated config.json, config but no weights:
    an interrupted save); anything else is an unknown path or hub repo.
    """
    import json
    from pathlib import Path

    path = Path(str(name)).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return OSError(
                f"{path} has no config.json, so it is not a SUREID checkpoint folder "
                "(save_pretrained writes config.json and model.safetensors); check the path"
            )
        try:
            json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as bad:
            return SureidError(
                f"{config} is not valid JSON ({bad}): the file is truncated or corrupt (an "
                "interrupted save or copy?); save the checkpoint again or use another one"
            )
        if not any(path.glob("*.safetensors")):
            return OSError(
                f"{path} has config.json but no model.safetensors: the save did not finish "
                "(interrupted?) or the weights were removed; use a complete checkpoint"
            )
        return OSError(f"cannot load the SUREID checkpoint in {path}: {err}")
    if path.is_file():
        return OSError(
            f"{path} is a file; pass the checkpoint folder (config.json and model.safetensors) "
            "or a Hugging Face Hub repo id"
        )
    text = str(name)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        return FileNotFoundError(
            f"no such checkpoint folder: {path}; check the path (a Hugging Face Hub repo id "
            "looks like 'org/name')"
        )
    return OSError(
        f"cannot load a SUREID checkpoint from {str(name)!r}: it is not a local directory with "
        "config.json and model.safetensors, and the Hugging Face Hub (or its cache, when "
        f"HF_HUB_OFFLINE=1) has no such repo. Check the path or repo id. ({err})"
    )


def _corrupt_weights(name, err: Exception) -> SureidError:
    """safetensors could not parse the weights: name the file (truncated or not safetensors)."""
    from pathlib import Path

    local = Path(str(name)).expanduser() / "model.safetensors"
    where = str(local) if local.is_file() else f"the model.safetensors of {name}"
    return SureidError(
        f"not a valid safetensors file: {where} ({err}); it is truncated or corrupt (an "
        "interrupted save, copy or download): save or download the checkpoint again"
    )


_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def _check_checkpoint_kind(cls, name, kwargs: dict) -> None:
    """Refuse a teacher checkpoint loaded as a student (or the reverse) with the right loader.

    Without this the other class's config defaults meet the checkpoint's fields and fail on
    something unrelated (``sparsify_layers``), or load with half the tensors unexpected.
    """
    from transformers import PreTrainedConfig

    wanted = cls.config_class.model_type
    kinds = {
        SureidTeacherConfig.model_type: ("teacher", "SureidTeacherModel"),
        SureidStudentConfig.model_type: ("student", "SureidStudentModel"),
    }
    if wanted not in kinds:  # SureidPreTrainedModel itself, or a subclass with its own type
        return
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(name, **hub)
    except OSError as err:
        raise _not_found(name, err) from err
    found = config_dict.get("model_type")
    if found == wanted:
        return
    if found in kinds:
        kind, right = kinds[found]
        raise SureidError(
            f"{name} is a {kind} checkpoint; use SureidModel.from_pretrained (loads either kind) "
            f"or {right}.from_pretrained, not {cls.__name__}"
        )
    raise SureidError(
        f"{name}: config.json has model_type {found!r}, so it is not a SUREID {kinds[wanted][0]} "
        f"checkpoint ({wanted!r}); SUREID models load {sorted(kinds)} checkpoints"
    )


class SureidPreTrainedModel(PreTrainedModel):
    """Weight init, the image processor saved beside the weights, and timm import."""

    config_class = SureidConfig
    base_model_prefix = "sureid"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if module.running_mean is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
        elif isinstance(module, SureidEncoder):
            trunc_normal_(module.pos_embed, std=std)
            nn.init.normal_(module.cls_token, std=1e-6)
            if module.dist_token is not None:
                trunc_normal_(module.dist_token, std=std)
        elif isinstance(module, BNNeck) and module.classifier is not None:
            nn.init.normal_(module.classifier.weight, std=0.001)
        elif isinstance(module, SureidStudentModel) and module.cls_reweight_lambda is not None:
            module.cls_reweight_lambda.fill_(module.config.cls_reweight_init)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses partial loads, naming the tensors.

        Weights of another shape, or tensors missing from (or unknown to) the checkpoint, raise
        ``SureidError`` unless ``ignore_mismatched_sizes=True`` is passed, in which case those
        tensors keep their fresh initialisation.
        """
        from safetensors import SafetensorError

        allow_partial = kwargs.pop("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("config") is None:
            _check_checkpoint_kind(cls, pretrained_model_name_or_path, kwargs)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
        except OSError as err:
            raise _not_found(pretrained_model_name_or_path, err) from err
        except SafetensorError as err:
            raise _corrupt_weights(pretrained_model_name_or_path, err) from err
        problems = []
        if info["mismatched_keys"]:
            problems.append(
                "shape mismatch: "
                + "; ".join(
                    f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(own)}"
                    for key, ckpt, own in sorted(info["mismatched_keys"])
                )
            )
        if info["missing_keys"]:
            problems.append("missing from checkpoint: " + ", ".join(sorted(info["missing_keys"])))
        if info["unexpected_keys"]:
            problems.append("not in the model: " + ", ".join(sorted(info["unexpected_keys"])))
        if problems and not allow_partial:
            raise SureidError(
                f"{pretrained_model_name_or_path} does not fit {cls.__name__} with this config: "
                + " | ".join(problems)
                + ". Pass a config that matches the checkpoint, or ignore_mismatched_sizes=True "
                "to re-initialise the tensors named here (e.g. a new classifier)."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors) and config, plus the matching ``SureidImageProcessor``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        from .image_processing_sureid import SureidImageProcessor

        if kwargs.get("is_main_process", True):
            SureidImageProcessor.from_model_config(self.config).save_pretrained(save_directory)

    def _head(self, features: torch.Tensor, labels: torch.Tensor | None):
        neck, logits = self.head(features)
        embeddings = neck if self.config.neck_feat == "after" else features
        loss = None
        if labels is not None:
            if logits is None:
                raise SureidError(
                    "labels were given but the model has no classifier (num_identities=0); "
                    "set num_identities in the config to train with identity labels"
                )
            loss = F.cross_entropy(logits.float(), labels)
        return loss, embeddings, logits

    @classmethod
    def from_timm(
        cls,
        name: str,
        checkpoint=None,
        **config_overrides,
    ):
        """Build this model with ImageNet ViT/DeiT weights from timm.

        ``checkpoint`` may be a timm model, a state dict, or a ``.pth``/``.safetensors`` path; when
        it is None timm downloads its pretrained weights (network). Position embeddings are
        resampled from the ImageNet grid to the ReID grid; the classifier head is dropped.
        """
        from .convert import config_from_timm_name, load_timm_state_dict

        config_cls = cls.config_class
        config = config_from_timm_name(name, config_cls, **config_overrides)
        model = cls(config)
        load_timm_state_dict(model, name, checkpoint)
        return model


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class SureidTeacherModel(SureidPreTrainedModel):
    """The dense ViT teacher: encoder + BNNeck, no token sparsification."""

    config_class = SureidTeacherConfig

    def __init__(self, config: SureidTeacherConfig):
        super().__init__(config)
        self.encoder = SureidEncoder(config)
        self.head = BNNeck(config)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> SureidModelOutput:
        x = self.encoder.embed(pixel_values)
        last = len(self.encoder.blocks) - 1
        for i, block in enumerate(self.encoder.blocks):
            x = block(x, cls_only=i == last)  # only the class token is read after the last block
        features = self.encoder.norm(x[:, 0])
        loss, embeddings, logits = self._head(features, labels)
        return SureidModelOutput(loss=loss, features=features, embeddings=embeddings, logits=logits)


class SureidStudentModel(SureidPreTrainedModel):
    """The HTS student: TokenPredictors before ``sparsify_layers``, class-token reweight, BNNeck.

    Training mode runs the masked path (Gumbel decisions, eq. (1)-(6)); eval mode really drops
    tokens (top-k per stage). ``forward(..., hts_decisions="topk")`` in training mode runs the
    masked path with the deterministic top-k decisions of the eval path (used to check that the
    two paths agree).
    """

    config_class = SureidStudentConfig

    def __init__(self, config: SureidStudentConfig):
        super().__init__(config)
        self.encoder = SureidEncoder(config)
        self.predictors = nn.ModuleList(
            TokenPredictor(config.hidden_size, config.layer_norm_eps)
            for _ in (config.sparsify_layers if config.hts_enabled else [])
        )
        self.cls_reweight_lambda = (
            nn.Parameter(torch.full((1,), config.cls_reweight_init))
            if config.cls_reweight
            else None
        )
        self.head = BNNeck(config)
        self._stage_of_layer = (
            {layer: j for j, layer in enumerate(config.sparsify_layers)}
            if config.hts_enabled
            else {}
        )
        self._keep_counts = config.stage_keep_counts if config.hts_enabled else []
        self.post_init()

    def _reweight(self, x: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
        """Eq. (7)-(8) on the tokens entering the last block, in training only.

        Our reading (docs/method.md): the class token's head-averaged attention over the image
        tokens scales them before the final aggregation, ``x + lambda * [x_cls, a * x_img]``.
        Like the paper, inference skips it, so the eval path costs nothing extra.
        """
        p = self.config.num_prefix_tokens
        last = self.encoder.blocks[-1]
        attn_cls = last.attn.cls_attention(last.norm1(x), p, policy)  # [B, N_img]
        update = torch.cat([x[:, :p], attn_cls.unsqueeze(-1).to(x.dtype) * x[:, p:]], dim=1)
        return x + self.cls_reweight_lambda.to(x.dtype) * update

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        hts_decisions: str | None = None,
        **kwargs,
    ) -> SureidModelOutput:
        """``hts_decisions``: None (training: "gumbel", eval: true dropping), "topk" (masked path
        with the eval path's decisions, any mode) or "random" (masked path keeping as many tokens
        as "topk", chosen uniformly at random: the baseline a trained predictor must beat)."""
        if hts_decisions not in (None, "gumbel", "topk", "random"):
            raise SureidError(
                f"hts_decisions must be None, 'gumbel', 'topk' or 'random', got {hts_decisions!r}"
            )
        if self.training or hts_decisions is not None:
            return self._forward_masked(pixel_values, labels, hts_decisions or "gumbel")
        return self._forward_dropped(pixel_values, labels)

    def _forward_masked(self, pixel_values, labels, decisions: str) -> SureidModelOutput:
        p = self.config.num_prefix_tokens
        x = self.encoder.embed(pixel_values)
        b, n_img = x.shape[0], x.shape[1] - p
        keep_mask = None  # running mask D_hat over image tokens, [B, N_img]
        policy = None  # keep mask over all tokens, prefix always 1
        masks, probs = [], []
        last = len(self.encoder.blocks) - 1
        for i, block in enumerate(self.encoder.blocks):
            stage = self._stage_of_layer.get(i)
            if stage is not None:
                if keep_mask is None:
                    keep_mask = x.new_ones(b, n_img, dtype=torch.float32)
                logits = self.predictors[stage](x[:, p:], keep_mask).float()
                probs.append(logits.softmax(dim=-1)[..., 1])
                if decisions == "gumbel":
                    decision = F.gumbel_softmax(logits, tau=self.config.gumbel_tau, hard=True)[
                        ..., 1
                    ]
                    keep_mask = keep_mask * decision
                else:
                    score = (
                        logits[..., 1] - logits[..., 0]
                        if decisions == "topk"
                        else torch.rand_like(logits[..., 0])
                    ).masked_fill(keep_mask == 0, float("-inf"))
                    top = score.topk(self._keep_counts[stage], dim=1).indices
                    keep_mask = torch.zeros_like(keep_mask).scatter(1, top, 1.0)
                masks.append(keep_mask)
                policy = torch.cat([keep_mask.new_ones(b, p), keep_mask], dim=1)
            if i == last and self.training and self.cls_reweight_lambda is not None:
                x = self._reweight(x, policy)
            x = block(x, policy, cls_only=i == last)
        features = self.encoder.norm(x[:, 0])
        loss, embeddings, logits_id = self._head(features, labels)
        return SureidModelOutput(
            loss=loss,
            features=features,
            embeddings=embeddings,
            logits=logits_id,
            keep_masks=tuple(masks) if masks else None,
            keep_probs=tuple(probs) if probs else None,
        )

    def _forward_dropped(self, pixel_values, labels) -> SureidModelOutput:
        p = self.config.num_prefix_tokens
        x = self.encoder.embed(pixel_values)
        b = x.shape[0]
        # Patch-grid index of every image token still in the tensor, [B, N_cur].
        grid_index = None
        kept = []
        last = len(self.encoder.blocks) - 1
        for i, block in enumerate(self.encoder.blocks):
            stage = self._stage_of_layer.get(i)
            if stage is not None:
                k = self._keep_counts[stage]
                score = self.predictors[stage].keep_score(x[:, p:])
                top = score.topk(k, dim=1, sorted=False).indices  # [B, k]
                # One indexed copy: the prefix tokens (rows 0..p-1) plus the kept image tokens,
                # as rows of the flattened [B * N_cur, C] tensor (index_select copies whole rows,
                # several times faster on CPU than a gather with an expanded index).
                n_cur, c = x.shape[1], x.shape[2]
                prefix_rows = torch.arange(p, device=x.device).expand(b, p)
                rows = torch.cat([prefix_rows, top + p], dim=1)
                rows = rows + torch.arange(b, device=x.device).unsqueeze(1) * n_cur
                x = x.reshape(b * n_cur, c).index_select(0, rows.reshape(-1)).reshape(b, p + k, c)
                grid_index = top if grid_index is None else grid_index.gather(1, top)
                kept.append(grid_index)
            x = block(x, cls_only=i == last)
        # Only the class token is read: the last block computed that row alone, and the final
        # LayerNorm (per token) normalises it alone.
        features = self.encoder.norm(x[:, 0])
        loss, embeddings, logits = self._head(features, labels)
        return SureidModelOutput(
            loss=loss,
            features=features,
            embeddings=embeddings,
            logits=logits,
            kept_indices=tuple(kept) if kept else None,
        )


class SureidModel:
    """Loads a SUREID checkpoint as the class its config names (teacher or student).

    ``SureidModel.from_pretrained("org/sureid-deit-occduke")`` or a local directory; keyword
    arguments go to ``PreTrainedModel.from_pretrained``.
    """

    _classes = {
        SureidTeacherConfig.model_type: SureidTeacherModel,
        SureidStudentConfig.model_type: SureidStudentModel,
    }

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "SureidModel is a loader: use SureidModel.from_pretrained(path_or_repo), or build "
            "SureidTeacherModel / SureidStudentModel from a config"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from transformers import AutoConfig

        config = kwargs.pop("config", None)
        if config is None:
            config_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            try:
                config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
            except OSError as err:
                raise _not_found(pretrained_model_name_or_path, err) from err
        model_cls = cls._classes.get(getattr(config, "model_type", None))
        if model_cls is None:
            raise SureidError(
                f"{pretrained_model_name_or_path}: config.json has model_type "
                f"{getattr(config, 'model_type', None)!r}; SureidModel loads "
                f"{sorted(cls._classes)} checkpoints"
            )
        return model_cls.from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )

    @classmethod
    def from_config(cls, config: SureidConfig):
        """A randomly initialised teacher or student for ``config``."""
        model_cls = cls._classes.get(config.model_type)
        if model_cls is None:
            raise SureidError(f"no SUREID model for model_type {config.model_type!r}")
        return model_cls(config)


__all__ = [
    "SureidError",
    "SureidModelOutput",
    "SureidPreTrainedModel",
    "SureidTeacherModel",
    "SureidStudentModel",
    "SureidModel",
    "TokenPredictor",
    "masked_softmax",
]
