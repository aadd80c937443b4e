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

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_sureid import (
    SureidConfig,
    SureidError,
    SureidStudentConfig,
    SureidTeacherConfig,
)
from .hooks import (  # noqa: F401  (the registries, re-exported)
    _NAME_RESOLVERS,
    _NAME_SUGGESTERS,
    _SAVE_HOOKS,
    register_checkpoint_hooks,
    resolve_name,
    run_save_hooks,
    suggestions,
)
from .image_processing_sureid import SureidImageProcessor  # registered with it, as the models
from .permissions import give_umask_permissions

# How the masked path decides which tokens to keep at a stage: ``decide(stage, keep_logit,
# keep_mask) -> new keep_mask`` (``SureidStudentModel.forward_masked``). Training samples with
# the config's ``hts_sampling``; ``SureidStudentModel.keep_topk`` is the eval path's choice;
# ``sureid.analysis`` passes its own (random keeping, an oracle's ranking).
Decide = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

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
    keep_logits: student, training mode: the predictor's keep-minus-drop logit per image token and
        stage (``sigmoid(keep_logits) == keep_probs``), [B, N]; what the token-guidance loss trains.
    kept_indices: student, eval mode: indices into the patch grid (row-major) of the image tokens
        kept after each stage, [B, k_j], one per stage.
    attentions: teacher with ``output_attentions=True``: each block's head-averaged attention
        weights, [B, N, N] (the last block's class-token row alone, [B, 1, N]); what token
        guidance and ``sureid.analysis`` read.
    """

    loss: torch.Tensor | None = None
    features: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    keep_masks: tuple[torch.Tensor, ...] | None = None
    keep_probs: tuple[torch.Tensor, ...] | None = None
    keep_logits: tuple[torch.Tensor, ...] | None = None
    kept_indices: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


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
        self,
        x: torch.Tensor,
        policy: torch.Tensor | None = None,
        cls_only: bool = False,
        return_attention: bool | str = False,
    ):
        """[B, N, C] -> [B, N, C]; with ``cls_only`` -> [B, 1, C], the class token's row alone.

        ``cls_only`` computes the query of the class token only (keys and values of every token):
        the same row 0 as the full computation, at about half of the attention's cost (the
        projection then runs on one token). ``return_attention`` also returns the head-averaged
        attention weights [B, M, N] (M = N, or 1 with ``cls_only``); they are then computed
        explicitly instead of by the fused SDPA kernel. ``return_attention="norm"``: each weight
        times the norm of what its key token adds to the output through that head,
        ``a_ij * ||W_O^h v_j^h||`` (Kobayashi et al., 2020), then averaged over heads.
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
        attn = None
        if policy is None and not return_attention:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if policy is None:
                attn = scores.float().softmax(dim=-1)
            else:
                attn = masked_softmax(scores, policy)
            out = attn.to(v.dtype) @ v
        out = self.proj(out.transpose(1, 2).reshape(b, m, c))
        if return_attention == "norm":
            w_o = self.proj.weight.float().reshape(c, self.num_heads, self.head_dim)
            added = torch.einsum("bhnd,chd->bhnc", v.float(), w_o).norm(dim=-1)  # [B, H, N]
            attn = attn * added[:, :, None, :]
        if return_attention:
            return out, attn.mean(dim=1)
        return out

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
        self,
        x: torch.Tensor,
        policy: torch.Tensor | None = None,
        cls_only: bool = False,
        return_attention: bool | str = False,
    ):
        """[B, N, C] -> [B, N, C]; with ``cls_only`` -> [B, 1, C]: the class token's output only.

        The models run their last block with ``cls_only`` because only the class token is read
        after it: attention then computes one query row, and the projection and MLP one token.
        The class token comes out the same as from the full block (forward and backward).
        ``return_attention``: also return the head-averaged attention weights (see ``Attention``).
        """
        attn = None
        h = self.attn(self.norm1(x), policy, cls_only=cls_only, return_attention=return_attention)
        if return_attention:
            h, attn = h
        # One expression per residual, so the attention output is freed right after the add.
        x = (x[:, :1] if cls_only else x) + self.drop_path(h)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


class TokenPredictor(nn.Module):
    """HTS keep/drop predictor, eq. (1), after DynamicViT.

    Each image token's feature is split into a local half and a global half; the global half is
    averaged over the currently kept tokens (mask-weighted, eps in the denominator) and appended
    to every token; an MLP maps the result to two logits (index 1 = keep).

    ``keep_prior``: the share of the incoming tokens the stage keeps (the config's keep rate).
    A new predictor starts there: its last layer's bias makes the keep probability
    ``keep_prior`` for every token (weights near zero), so training need not first move every
    token's keep logit to the budget. That uniform move is what taught the paper's recipe to
    keep the background (docs/method.md#why-the-predictors-dropped-the-person).
    """

    def __init__(self, hidden_size: int, layer_norm_eps: float = 1e-6, keep_prior: float = 0.5):
        super().__init__()
        if not 0.0 < keep_prior < 1.0:
            raise ValueError(f"keep_prior must be in (0, 1), got {keep_prior}")
        self.keep_prior = float(keep_prior)
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
        """Inference: a score monotone in the keep probability, [B, N].

        Computes ``forward(x)[..., 1] - forward(x)[..., 0]`` with only what the decision needs:
        the global half enters the first ``out_conv`` layer as one bias vector per image (not a
        concatenated copy per token), and the last layer collapses to the difference of its two
        rows. The last layer's bias difference, the same for every token, is left out: top-k
        does not depend on it, and without that offset (the keep prior, e.g. logit(0.7))
        fp16/bf16 keep their precision for what differs between tokens. Equal to the logit
        difference minus that constant, up to float rounding; no softmax, no noise.
        """
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        fc1, act1, fc2, act2, fc3 = self.out_conv
        global_x = h[..., half:].sum(dim=1, keepdim=True) / (h.shape[1] + _EPS)  # [B, 1, C/2]
        image_bias = F.linear(global_x, fc1.weight[:, half:], fc1.bias)  # [B, 1, C/2]
        w_local = fc1.weight[:, :half].t().expand(h.shape[0], -1, -1)
        z = act1(torch.baddbmm(image_bias, h[..., :half], w_local))  # bias add fused in the GEMM
        z = act2(fc2(z))
        return z @ (fc3.weight[1] - fc3.weight[0])

    @torch.no_grad()
    def start_at_prior(self) -> None:
        """Set the last layer's bias so a new predictor keeps ``keep_prior`` of the tokens."""
        bias = self.out_conv[-1].bias
        bias.zero_()
        bias[1] = math.log(self.keep_prior / (1.0 - self.keep_prior))


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


# How long the Hub check before an uncached download waits for a connection (seconds). Without
# the check, a machine with no route to the Hub (or an HF_ENDPOINT that does not answer) has
# huggingface_hub retry its HEAD request five times, 23 s of back-off, before anything fails.
_HUB_CONNECT_TIMEOUT = 5.0
# How an error says where the Hub's cache is and how to work offline.
_OFFLINE_HOWTO = (
    "To work offline, pass a local checkpoint folder (what save_pretrained writes: config.json "
    "and model.safetensors), or set HF_HUB_OFFLINE=1 with a Hugging Face cache that an earlier "
    "download filled (HF_HOME, or cache_dir=, says where it is)"
)


def _local_looking(text: str) -> bool:
    """A name that can only be a path (never a Hub repo id such as 'org/name')."""
    from pathlib import Path

    return (
        Path(text).expanduser().is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
    )


def _hub_repo_id(name) -> str | None:
    """``name`` when it reads as a Hugging Face Hub repo id and is not a local path; else None."""
    from pathlib import Path

    if not isinstance(name, str):
        if not hasattr(name, "__fspath__"):
            return None
        name = str(name)
    if Path(name).expanduser().exists() or _local_looking(name):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _offline_reason(kwargs: dict) -> str | None:
    """Why no request may reach the Hub for this load (None: it may)."""
    if kwargs.get("local_files_only"):
        return "local_files_only=True"
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1"
    return None


def _cache_text(kwargs: dict) -> str:
    from huggingface_hub import constants

    return str(kwargs.get("cache_dir") or constants.HF_HUB_CACHE)


def _in_hub_cache(repo_id: str, kwargs: dict) -> bool:
    """Whether the Hub cache holds the repo's config.json and weights (at the revision asked
    for): then huggingface_hub falls back to them at once when the Hub does not answer."""
    from huggingface_hub import try_to_load_from_cache

    subfolder = kwargs.get("subfolder") or ""

    def cached(filename: str) -> bool:
        found = try_to_load_from_cache(
            repo_id,
            f"{subfolder}/{filename}" if subfolder else filename,
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
        )
        return isinstance(found, str)

    return cached("config.json") and (
        cached("model.safetensors") or cached("model.safetensors.index.json")
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the Hub's HTTP client raises when no answer comes (no route, refused, DNS, timeout):
    httpx's TransportError (huggingface_hub's client, whichever of httpx / httpx2 it uses) and
    OSError (socket errors; requests' errors derive from it)."""
    import sys

    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        error = getattr(sys.modules.get(module), "TransportError", None)
        if isinstance(error, type):
            found.append(error)
    return tuple(found)


def _hub_timeout():
    """A short connect timeout (the answer itself may take huggingface_hub's usual time)."""
    import sys

    from huggingface_hub import constants

    for module in ("httpx2", "httpx"):
        timeout = getattr(sys.modules.get(module), "Timeout", None)
        if timeout is not None:
            return timeout(constants.HF_HUB_ETAG_TIMEOUT, connect=_HUB_CONNECT_TIMEOUT)
    return _HUB_CONNECT_TIMEOUT


def _hub_unreachable(name, err: BaseException, kwargs: dict) -> ConnectionError:
    from huggingface_hub import constants

    text = str(name)
    why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    zoo = suggestions(text) if "/" not in text else ""
    return ConnectionError(
        f"cannot load {text!r}: the Hugging Face Hub could not be reached at "
        f"{constants.ENDPOINT} ({why}), and the cache ({_cache_text(kwargs)}) has no copy of "
        f"it. Check the network (or HF_ENDPOINT, or the proxy settings). {_OFFLINE_HOWTO}.{zoo}"
    )


def _prepare_hub_load(name, kwargs: dict) -> None:
    """Before ``from_pretrained`` downloads a Hub repo that is not in the cache: one HEAD
    request of its config.json, without retries and with a short connect timeout.

    No answer raises ``ConnectionError`` at once (saying the Hub could not be reached and how
    to work offline) instead of huggingface_hub's retries; an unknown repo raises the not-found
    error. Nothing is asked of the Hub for a local folder, offline (``HF_HUB_OFFLINE=1``,
    ``local_files_only=True``), or a repo already in the cache (that loads without the Hub).
    """
    repo_id = _hub_repo_id(name)
    if repo_id is None or _offline_reason(kwargs) or _in_hub_cache(repo_id, kwargs):
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    url = hf_hub_url(
        repo_id,
        "config.json",
        subfolder=kwargs.get("subfolder") or None,
        revision=kwargs.get("revision"),
    )
    try:
        get_hf_file_metadata(url, token=kwargs.get("token"), timeout=_hub_timeout())
    except GatedRepoError:
        return  # perhaps readable with the token the load uses: the load reports it
    except RepositoryNotFoundError as err:
        raise _not_found(name, OSError(str(err)), kwargs, hub_error=err) from err
    except HfHubHTTPError:
        return  # the Hub answered (gated, no such file, busy): the load reports it
    except _transport_errors() as err:
        raise _hub_unreachable(name, err, kwargs) from err


def _hub_failure(err: BaseException) -> BaseException | None:
    """The huggingface_hub error (or the HTTP client's) behind transformers' OSError, if any."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    transport = _transport_errors()[1:]
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (HfHubHTTPError, LocalEntryNotFoundError, *transport)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _not_found(name, err: OSError, kwargs: dict | None = None, hub_error=None) -> Exception:
    """The error for a checkpoint that does not load: it names the file at fault and the fix.

    A local folder is examined (no config.json, a truncated config.json, config but no weights:
    an interrupted save); a path that does not exist is named; a Hub repo id gets the reason:
    offline and not in the cache, the Hub unreachable, no such repo (or revision).
    """
    from pathlib import Path

    kwargs = kwargs or {}
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return _folder_problem(path, err)
    if path.is_file():
        return OSError(
            f"{path} is a file; pass the checkpoint folder (config.json and model.safetensors) "
            "or a Hugging Face Hub repo id"
        )
    text = str(name)
    if _local_looking(text):
        return FileNotFoundError(
            f"no such checkpoint folder: {path}; check the path (a Hugging Face Hub repo id "
            "looks like 'org/name')"
        )
    zoo = suggestions(text) if "/" not in text else ""  # a bare name: perhaps a misspelt zoo id
    offline = _offline_reason(kwargs)
    if offline:
        return OSError(
            f"cannot load {text!r}: it is not a local folder, and offline ({offline}) only the "
            f"Hugging Face cache ({_cache_text(kwargs)}) is searched, which has no copy of it. "
            "Load it once with a network (the cache then keeps it), or pass a local checkpoint "
            f"folder (config.json and model.safetensors).{zoo}"
        )
    return _hub_problem(name, err, kwargs, hub_error, zoo)


def _folder_problem(path, err: OSError) -> Exception:
    """What makes a local folder not load: no config.json, a corrupt one, no weights."""
    import json

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


def _hub_problem(name, err: OSError, kwargs: dict, hub_error, zoo: str) -> Exception:
    """Why a Hub repo id did not load: the Hub unreachable, gated, no such revision, file or
    repo (``zoo``: the "did you mean" hint for a bare name)."""
    text = str(name)
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cause = hub_error or _hub_failure(err)
    if isinstance(cause, (LocalEntryNotFoundError, *_transport_errors()[1:])):
        return _hub_unreachable(name, cause, kwargs)
    if isinstance(cause, GatedRepoError):
        return OSError(
            f"cannot load {text!r}: the Hugging Face Hub repo is gated or private and this "
            "token may not read it; request access on its page and log in (`hf auth login`, or "
            "HF_TOKEN)"
        )
    if isinstance(cause, RevisionNotFoundError):
        return OSError(
            f"cannot load {text!r}: the Hugging Face Hub repo has no revision "
            f"{kwargs.get('revision')!r}; pass a branch, tag or commit it has"
        )
    if isinstance(cause, EntryNotFoundError):
        return OSError(
            f"cannot load {text!r}: the Hugging Face Hub repo has no config.json or "
            f"model.safetensors, so it is not a SUREID checkpoint ({' '.join(str(err).split())})"
        )
    if isinstance(cause, RepositoryNotFoundError) or cause is None:
        return OSError(
            f"cannot load a SUREID checkpoint from {text!r}: it is not a local folder, and the "
            "Hugging Face Hub has no such repo (or it is private: log in with `hf auth login` "
            f"or set HF_TOKEN). Check the path or repo id.{zoo}"
        )
    return OSError(f"cannot load {text!r} from the Hugging Face Hub: {err}{zoo}")


def _corrupt_weights(name, err: Exception) -> SureidError:
    """safetensors could not parse the weights: name the file (truncated or not safetensors)."""
    from pathlib import Path

    local = Path(str(name)).expanduser() / "model.safetensors"
    where = str(local) if local.is_file() else f"the model.safetensors of {name}"
    return SureidError(
        f"not a valid safetensors file: {where} ({err}); it is truncated or corrupt (an "
        "interrupted save, copy or download): save or download the checkpoint again"
    )


_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")
# SUREID's checkpoint kinds: model_type -> (kind, the class that loads it)
_KINDS = {
    SureidTeacherConfig.model_type: ("teacher", "SureidTeacherModel"),
    SureidStudentConfig.model_type: ("student", "SureidStudentModel"),
}


def _config_file(name) -> str:
    """The config.json of ``name`` in words (the path when ``name`` is a folder)."""
    from pathlib import Path

    path = Path(str(name)).expanduser()
    return str(path / "config.json") if path.is_dir() else f"the config.json of {name}"


def _not_sureid(name, found) -> SureidError:
    """``model_type`` ``found`` is none of SUREID's: say so, and what SUREID loads."""
    import difflib

    loads = " and ".join(f"{t!r} ({cls})" for t, (_, cls) in sorted(_KINDS.items()))
    close = difflib.get_close_matches(str(found), list(_KINDS), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = f"has model_type {found!r}{hint}" if found is not None else "has no model_type"
    return SureidError(
        f"{_config_file(name)} {what}: not a SUREID checkpoint. SUREID loads model_type "
        f"{loads}, as its save_pretrained writes them; a checkpoint of another library loads "
        "with that library (e.g. transformers.AutoModel)"
    )


def _read_config_dict(name, kwargs: dict) -> dict:
    """config.json of ``name`` as a dict (through the Hub cache for a repo id)."""
    from transformers import PreTrainedConfig

    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(name, **hub)
    except OSError as err:
        raise _not_found(name, err, kwargs) from err
    return config_dict


def _check_checkpoint_kind(cls, name, kwargs: dict) -> None:
    """Refuse a teacher checkpoint loaded as a student (or the reverse) with the right loader.

    Without this the other class's config defaults meet the checkpoint's fields and fail on
    something unrelated (``sparsify_layers``), or load with half the tensors unexpected.
    """
    wanted = cls.config_class.model_type
    if wanted not in _KINDS:  # SureidPreTrainedModel itself, or a subclass with its own type
        return
    found = _read_config_dict(name, kwargs).get("model_type")
    if found == wanted:
        return
    if found in _KINDS:
        kind, right = _KINDS[found]
        raise SureidError(
            f"{name} is a {kind} checkpoint; use SureidModel.from_pretrained (loads either kind) "
            f"or {right}.from_pretrained, not {cls.__name__}"
        )
    raise _not_sureid(name, found)


def _listed(items: list[str], limit: int = 6, sep: str = ", ") -> str:
    """The first ``limit`` items, and how many more there are."""
    shown = sep.join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


_BARS_LOCK = threading.Lock()
_BARS_HIDDEN = {"depth": 0, "state": None}  # overlapping loads and saves share one saved state


def _no_progress_bars():
    """Hide transformers' own progress bars ("Loading weights", "Writing model shards") while
    a SUREID model is read from or written to a local folder: a few hundred tensors, done in
    well under a second, so the bars are noise in every command. Returns the function that
    restores the bars as they were before the first of overlapping calls (Hub downloads keep
    theirs: remote loads do not call this).
    """
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    with _BARS_LOCK:
        if _BARS_HIDDEN["depth"] == 0:
            state = (hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled())
            _BARS_HIDDEN["state"] = state
            hf_logging.disable_progress_bar()
        _BARS_HIDDEN["depth"] += 1

    def restore() -> None:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        with _BARS_LOCK:
            _BARS_HIDDEN["depth"] -= 1
            if _BARS_HIDDEN["depth"]:
                return
            ours, hubs = _BARS_HIDDEN["state"]
            if ours:
                hf_logging.enable_progress_bar()  # (turns the Hub's back on too)
            if not hubs:
                disable_progress_bars()
            elif not ours:
                enable_progress_bars()

    return restore


def _quiet_load_report():
    """Drop transformers' load report (a table of every tensor that did not fit, logged as a
    warning) while a SUREID load runs: ``from_pretrained`` raises one error naming them, or,
    with ``ignore_mismatched_sizes=True``, logs one line. Returns the function that restores it.
    """
    import logging

    class _NoLoadReport(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "LOAD REPORT" not in str(record.msg)

    loggers = [
        logging.getLogger(f"transformers.{m}") for m in ("modeling_utils", "modeling_layers")
    ]
    quiet = _NoLoadReport()
    for logger in loggers:
        logger.addFilter(quiet)

    def restore() -> None:
        for logger in loggers:
            logger.removeFilter(quiet)

    return restore


def _files_state(folder) -> dict:
    import os

    try:
        with os.scandir(folder) as entries:
            return {
                e.name: (e.stat().st_ino, e.stat().st_mtime_ns)
                for e in entries
                if e.is_file(follow_symlinks=False)
            }
    except OSError:
        return {}


def _give_umask_permissions(folder, before: dict) -> None:
    """Give the files a save wrote (new or rewritten since ``before``) the permissions the
    umask gives new files: safetensors writes its file owner-only (0600) whatever the umask,
    so a service account could not read a model another user saved."""
    changed = [name for name, state in _files_state(folder).items() if before.get(name) != state]
    give_umask_permissions(os.path.join(folder, name) for name in changed)


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
        # transformers visits only the modules with parameters of their own (so BNNeck and
        # TokenPredictor never come here): their Linear layers are recognised by identity.
        head = getattr(self, "head", None)
        if head is not None and module is head.classifier:
            nn.init.normal_(module.weight, std=0.001)  # BoT's identity classifier
        elif isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            for predictor in getattr(self, "predictors", ()):
                if module is predictor.out_conv[-1]:
                    predictor.start_at_prior()  # a new predictor keeps the budget's share
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
        elif isinstance(module, SureidStudentModel) and module.cls_reweight_lambda is not None:
            module.cls_reweight_lambda.fill_(module.config.cls_reweight_init)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses partial loads, naming the tensors.

        Weights of another shape, or tensors missing from (or unknown to) the checkpoint, raise
        ``SureidError`` unless ``ignore_mismatched_sizes=True`` is passed, in which case those
        tensors keep their fresh initialisation (and one warning line names them). transformers'
        own load report (a table of those tensors) is not printed.

        A Hub repo id that is not in the cache is first checked with one quick request: when
        the Hub cannot be reached the load fails at once, saying so (not after huggingface_hub's
        retries); offline (``HF_HUB_OFFLINE=1``) only the cache is searched.
        """
        from safetensors import SafetensorError

        pretrained_model_name_or_path, kwargs = resolve_name(pretrained_model_name_or_path, kwargs)
        name = pretrained_model_name_or_path
        allow_partial = kwargs.pop("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        if not kwargs.pop("_sureid_hub_checked", False):  # SureidModel checked it already
            _prepare_hub_load(name, kwargs)
        if kwargs.get("config") is None:
            _check_checkpoint_kind(cls, name, kwargs)
        restore_logging = _quiet_load_report()
        local = isinstance(name, str | os.PathLike) and os.path.isdir(name)
        restore_bars = _no_progress_bars() if local else (lambda: None)
        try:
            model, info = super().from_pretrained(
                name,
                *model_args,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
        except OSError as err:
            raise _not_found(name, err, kwargs) from err
        except SafetensorError as err:
            raise _corrupt_weights(name, err) from err
        finally:
            restore_logging()
            restore_bars()
        problems = []
        if info["mismatched_keys"]:
            mismatched = [
                f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(own)}"
                for key, ckpt, own in sorted(info["mismatched_keys"])
            ]
            problems.append("shape mismatch: " + _listed(mismatched, sep="; "))
        if info["missing_keys"]:
            problems.append("missing from checkpoint: " + _listed(sorted(info["missing_keys"])))
        if info["unexpected_keys"]:
            problems.append("not in the model: " + _listed(sorted(info["unexpected_keys"])))
        if problems and not allow_partial:
            raise SureidError(
                f"{name} does not fit {cls.__name__} with this config: "
                + " | ".join(problems)
                + ". Pass a config that matches the checkpoint, or ignore_mismatched_sizes=True "
                "to re-initialise the tensors named here (e.g. a new classifier)."
            )
        if problems:
            import logging

            logging.getLogger(__name__).warning(
                "%s: loaded into %s with ignore_mismatched_sizes=True; re-initialised: %s",
                name,
                cls.__name__,
                " | ".join(problems),
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors) and config, plus the matching ``SureidImageProcessor``.

        Then the save hooks run (``register_checkpoint_hooks``): importing ``sureid`` registers
        ``model_card.write_default_card``, so a folder without ``README.md`` also gets a model
        card without metrics; an existing card is kept as it is (the trainer and the demo write
        theirs, with the metrics they measured).

        The files it writes get the permissions the umask gives new files (0644 under umask
        022), as other programs' files do: safetensors alone would leave the weights owner-only.
        """
        before = _files_state(save_directory)
        restore_bars = _no_progress_bars()
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            restore_bars()

        if kwargs.get("is_main_process", True):
            SureidImageProcessor.from_model_config(self.config).save_pretrained(save_directory)
            run_save_hooks(self, save_directory)
        _give_umask_permissions(save_directory, before)

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
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> SureidModelOutput:
        """``output_attentions``: also return each block's head-averaged attention weights
        (``SureidModelOutput.attentions``), from which token guidance reads the class token's
        attention in the same pass that NPKD makes."""
        x = self.encoder.embed(pixel_values)
        last = len(self.encoder.blocks) - 1
        attentions = []
        for i, block in enumerate(self.encoder.blocks):
            # only the class token is read after the last block
            x = block(x, cls_only=i == last, return_attention=output_attentions)
            if output_attentions:
                x, attn = x
                attentions.append(attn)
        features = self.encoder.norm(x[:, 0])
        loss, embeddings, logits = self._head(features, labels)
        return SureidModelOutput(
            loss=loss,
            features=features,
            embeddings=embeddings,
            logits=logits,
            attentions=tuple(attentions) if output_attentions else None,
        )


class SureidStudentModel(SureidPreTrainedModel):
    """The HTS student: TokenPredictors before ``sparsify_layers``, class-token reweight, BNNeck.

    Training mode runs the masked path (eq. (1)-(6), the keep decisions sampled as the config's
    ``hts_sampling`` says); eval mode really drops tokens (top-k per stage).
    ``forward_masked(pixels, decide=model.keep_topk)`` runs the masked path with the eval
    path's decisions (a test holds that both give the same class token); ``sureid.analysis``
    passes other decisions (random keeping, an oracle's ranking) the same way.
    """

    config_class = SureidStudentConfig

    def __init__(self, config: SureidStudentConfig):
        super().__init__(config)
        self.encoder = SureidEncoder(config)
        self.predictors = nn.ModuleList(
            TokenPredictor(config.hidden_size, config.layer_norm_eps, config.keep_rate)
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
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> SureidModelOutput:
        """Training mode: the masked path, decisions sampled as ``hts_sampling`` says; eval
        mode: true token dropping (the top-k tokens per stage stay in the tensor)."""
        if "hts_decisions" in kwargs:
            raise SureidError(
                "hts_decisions was removed: run model.forward_masked(pixels, decide=...) with "
                "model.keep_topk (the eval path's decisions) or a sureid.analysis decision"
            )
        if self.training:
            return self.forward_masked(pixel_values, labels=labels)
        return self._forward_dropped(pixel_values, labels)

    def sample_decisions(
        self, stage: int, keep_logit: torch.Tensor, keep_mask: torch.Tensor
    ) -> torch.Tensor:
        """Training's decisions: the running mask ``D_hat * D`` (eq. 3) after ``stage``.

        ``keep_logit``: the predictor's keep-minus-drop logit [B, N] (eq. 1's softmax over the
        two logits is ``sigmoid(keep_logit)``); ``keep_mask``: the running mask before it.
        ``"gumbel"``: eq. (2), a hard per-token sample whose rate the ratio loss sets;
        ``"gumbel-topk"``: exactly the stage's k tokens (see the config).
        """
        if self.config.hts_sampling == "gumbel":
            two = torch.stack([torch.zeros_like(keep_logit), keep_logit], dim=-1)
            sample = F.gumbel_softmax(two, tau=self.config.gumbel_tau, hard=True)[..., 1]
            return keep_mask * sample
        # Exactly k tokens, sampled without replacement in proportion to exp(keep logit)
        # (Gumbel-top-k), with a straight-through gradient through a sigmoid centred on the
        # k-th / (k+1)-th boundary: the soft mask ranks, it has no absolute level to push.
        k, alive = self._keep_counts[stage], keep_mask > 0
        uniform = torch.rand_like(keep_logit).clamp(1e-9, 1 - 1e-9)
        noisy = (keep_logit - torch.log(-torch.log(uniform))).masked_fill(~alive, float("-inf"))
        ranked = noisy.topk(min(k + 1, noisy.shape[1]), dim=1).values
        threshold = ranked[:, k - 1 : k + 1].mean(dim=1, keepdim=True).detach()
        if not torch.isfinite(threshold).all():  # fewer than k + 1 tokens alive
            threshold = ranked[:, k - 1 : k].detach()
        soft = torch.sigmoid((noisy - threshold) / self.config.gumbel_tau).masked_fill(~alive, 0.0)
        hard = torch.zeros_like(keep_logit).scatter(1, noisy.topk(k, dim=1).indices, 1.0)
        return keep_mask * (hard + (soft - soft.detach()))  # exactly hard in the forward

    def keep_topk(
        self, stage: int, keep_logit: torch.Tensor, keep_mask: torch.Tensor
    ) -> torch.Tensor:
        """The eval path's decisions as a mask: the stage's k alive tokens of highest score."""
        return self.keep_top_scores(stage, keep_logit, keep_mask)

    def keep_top_scores(
        self, stage: int, scores: torch.Tensor, keep_mask: torch.Tensor
    ) -> torch.Tensor:
        """A 0/1 mask [B, N] of the stage's k tokens of highest ``scores`` among those alive in
        ``keep_mask`` (no gradient: a choice, not a sample)."""
        alive = keep_mask > 0
        top = (
            scores.float().masked_fill(~alive, float("-inf")).topk(self._keep_counts[stage], dim=1)
        )
        return torch.zeros_like(keep_mask).scatter(1, top.indices, 1.0)

    def forward_masked(
        self,
        pixel_values: torch.Tensor,
        decide: Decide | None = None,
        labels: torch.Tensor | None = None,
    ) -> SureidModelOutput:
        """All tokens flow; attention follows the running keep mask (eq. (5)-(6)).

        ``decide(stage, keep_logit, keep_mask) -> keep_mask`` chooses the kept tokens at each
        stage (default: ``sample_decisions``, training's). The output carries the masks, the
        keep probabilities and the keep logits of every stage.
        """
        decide = decide or self.sample_decisions
        p = self.config.num_prefix_tokens
        x = self.encoder.embed(pixel_values)
        b, n_img = x.shape[0], x.shape[1] - p
        keep_mask = None  # running mask D_hat over image tokens, [B, N_img]
        policy = None  # keep mask over all tokens, prefix always 1
        masks, probs, keep_logits = [], [], []
        last = len(self.encoder.blocks) - 1
        for i, block in enumerate(self.encoder.blocks):
            stage = self._stage_of_layer.get(i)
            if stage is not None:
                if keep_mask is None:
                    keep_mask = x.new_ones(b, n_img, dtype=torch.float32)
                logits = self.predictors[stage](x[:, p:], keep_mask).float()
                keep_logit = logits[..., 1] - logits[..., 0]
                probs.append(torch.sigmoid(keep_logit))
                keep_logits.append(keep_logit)
                keep_mask = decide(stage, keep_logit, keep_mask)
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
            keep_logits=tuple(keep_logits) if keep_logits else None,
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


@torch.no_grad()
def init_from_pretrained(model: SureidPreTrainedModel, source) -> dict[str, list[str]]:
    """Start ``model`` from another SUREID model's weights, as DynamicViT starts from a trained
    DeiT: the fine-tuning start of an HTS student (``sureid train student --init-from DIR``).

    ``source``: a SUREID model, or a checkpoint directory / hub id (teacher or student). The
    encoder must match entirely (else a SureidError names the tensors); every other tensor
    whose name and shape match is copied (BNNeck, classifier, predictors, reweight lambda).
    A classifier for another number of identities and predictors the source lacks (or has
    for other stages) stay new. Returns ``{"copied": [...], "new": [...]}`` (tensor names).
    """
    if not isinstance(source, nn.Module):
        source = SureidModel.from_pretrained(source)
    theirs = source.state_dict()
    ours = model.state_dict()
    bad = [
        f"{k}: {tuple(theirs[k].shape) if k in theirs else 'missing'} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k.startswith("encoder.") and (k not in theirs or theirs[k].shape != v.shape)
    ]
    if bad:
        raise SureidError(
            "the checkpoint's encoder does not fit this model (as checkpoint vs model): "
            + "; ".join(bad[:5])
            + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
            + ". Start from a checkpoint of the same architecture (width, depth, heads, patch, "
            "image size, prefix tokens)."
        )
    same_stages = list(getattr(source.config, "sparsify_layers", [])) == list(
        getattr(model.config, "sparsify_layers", [])
    )
    copied = [
        k
        for k, v in ours.items()
        if k in theirs
        and theirs[k].shape == v.shape
        and (same_stages or not k.startswith("predictors."))
    ]
    model.load_state_dict({k: theirs[k] for k in copied}, strict=False)
    return {"copied": copied, "new": [k for k in ours if k not in set(copied)]}


class SureidModel:
    """Loads a SUREID checkpoint as the class its config names (teacher or student).

    ``SureidModel.from_pretrained("org/sureid-deit-occduke")``, a local directory, or a zoo id
    (``"sureid-deit-occduke"``, see ``sureid.zoo``); keyword arguments go to
    ``PreTrainedModel.from_pretrained``.
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
        """The teacher or student of a checkpoint folder, Hub repo id or zoo id (``sureid.zoo``:
        a published entry loads its repo at its revision; a recipe raises with its commands).

        A config.json whose ``model_type`` is not SUREID's raises a ``SureidError`` that says
        so and names the types SUREID loads."""
        pretrained_model_name_or_path, kwargs = resolve_name(pretrained_model_name_or_path, kwargs)
        name = pretrained_model_name_or_path
        config = kwargs.pop("config", None)
        _prepare_hub_load(name, kwargs)
        if config is None:
            config_dict = _read_config_dict(name, kwargs)
            found = config_dict.get("model_type")
            if found not in cls._classes:
                raise _not_sureid(name, found)
            config_cls = cls._classes[found].config_class
            config = config_cls.from_dict(
                config_dict, name_or_path=str(name), _sureid_source=_config_file(name)
            )
        model_cls = cls._classes.get(getattr(config, "model_type", None))
        if model_cls is None:
            raise _not_sureid(name, getattr(config, "model_type", None))
        return model_cls.from_pretrained(
            name, *model_args, config=config, _sureid_hub_checked=True, **kwargs
        )

    @classmethod
    def from_config(cls, config: SureidConfig):
        """A randomly initialised teacher or student for ``config``."""
        model_cls = cls._classes.get(config.model_type)
        if model_cls is None:
            raise SureidError(f"no SUREID model for model_type {config.model_type!r}")
        return model_cls(config)


# Known to transformers' AutoModel as soon as the classes exist.
for _config_cls, _model_cls in (
    (SureidTeacherConfig, SureidTeacherModel),
    (SureidStudentConfig, SureidStudentModel),
):
    AutoModel.register(_config_cls, _model_cls, exist_ok=True)


__all__ = [
    "SureidError",
    "SureidModelOutput",
    "SureidPreTrainedModel",
    "SureidTeacherModel",
    "SureidStudentModel",
    "SureidModel",
    "TokenPredictor",
    "masked_softmax",
    "init_from_pretrained",
    "register_checkpoint_hooks",
]
