"""OPT in PyTorch: the decoder and the four Hugging Face model classes.

`state_dict()` keys are exactly Hugging Face's (`model.decoder.*`, `lm_head.weight`, `score.weight`,
`qa_outputs.*`; `decoder.*` for `OPTModel`), i.e. `opt_core.params.hf_name` of the canonical table,
so checkpoints load and save without renaming.

Shape letters, the same in opt_torch, opt_tf and opt_flax (comments and einsum subscripts):
B batch, T new tokens, S keys (cached + new, or a static cache's slots), H heads, D head_dim,
C hidden_size, E word_embed_proj_dim, F ffn_dim, V vocab, L num_labels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opt_core import POSITION_OFFSET, Head, OPTConfig
from opt_core.checkpoint import DEFAULT_SHARD_BYTES, FROM_PRETRAINED_DOC, SAVE_PRETRAINED_DOC
from opt_core.generation_config import GENERATE_DOC, GenerationConfig
from opt_core.inputs import validate_inputs
from opt_torch import generation
from opt_torch.cache import Cache, DynamicCache
from opt_torch.kernels import linear, pack
from opt_torch.losses import causal_lm_loss, question_answering_loss, sequence_classification_loss

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# Same names and formulas as opt_core.activations (and Hugging Face's ACT2FN).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


@dataclass
class OPTOutput:
    """What every model call returns; fields a model does not produce stay None.

    Attributes:
        loss: scalar, when labels (or QA start/end positions) are given.
        logits: [B, T, V] (causal LM) or [B, L] (sequence classification).
        last_hidden_state: [B, T, E], after the final LayerNorm and `project_out`.
        start_logits / end_logits: [B, T] (question answering).
        past_key_values: the cache, extended by this call (when caching).
        hidden_states: as Hugging Face returns them: the input of each layer ([B, T, C]; the first is
            the embeddings), then the final output (after final LayerNorm and project_out).
        attentions: per layer [B, H, T, S] (eager attention only).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


# ---------------------------------------------------------------- masks and positions
def positions_from_mask(attention_mask: torch.Tensor, past_length: int, query_length: int) -> torch.Tensor:
    """Position ids [B, T] of the T tokens after `past_length` in `attention_mask` [B, S] (torch
    twin of `opt_core.masks.positions_from_mask`): 0 at the first real token of a row, -1 at padding."""
    mask = attention_mask.long()
    positions = torch.cumsum(mask, dim=-1) * mask - 1  # [B, S]
    return positions[:, past_length : past_length + query_length]


def causal_padding_mask(attention_mask: torch.Tensor, past_length: int, query_length: int) -> torch.Tensor:
    """bool [B, 1, T, S]: query t (at slot past + t) may see key s (torch twin of
    `opt_core.masks.causal_padding_mask`)."""
    mask = attention_mask.bool()
    q_pos = torch.arange(query_length, device=mask.device)[:, None] + past_length  # [T, 1]
    k_pos = torch.arange(mask.shape[1], device=mask.device)[None, :]  # [1, S]
    return (k_pos <= q_pos)[None, None] & mask[:, None, None, :]


def last_non_pad_indices(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[B] index of each row's right-most non-pad id (torch twin of
    `opt_core.masks.last_non_pad_indices`); the last position for every row without a pad id."""
    b, t = input_ids.shape
    if pad_token_id is None:
        return torch.full((b,), t - 1, dtype=torch.long, device=input_ids.device)
    return (torch.arange(t, device=input_ids.device) * (input_ids != pad_token_id)).argmax(-1)


@dataclass
class AttentionMask:
    """How the layers mask attention, built once per call.

    allowed: bool [B, 1, T, S] or None (no padding: plain causal, or nothing at all for T == 1).
    is_causal: with allowed None, whether the causal triangle still applies (T > 1, no cache).
    padding: bool [B, S] (1 = real key) for flash attention's unpadding, or None without padding.
    """

    allowed: torch.Tensor | None
    is_causal: bool
    padding: torch.Tensor | None

    def dense(self, query_length: int, key_length: int, device: torch.device) -> torch.Tensor | None:
        """The bool [B or 1, 1, T, S] mask, materialised (eager attention and the non-trivial cases)."""
        if self.allowed is not None:
            return self.allowed
        if not self.is_causal and query_length == 1:
            return None
        past = key_length - query_length
        q_pos = torch.arange(query_length, device=device)[:, None] + past
        k_pos = torch.arange(key_length, device=device)[None, :]
        return (k_pos <= q_pos)[None, None]


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int
) -> AttentionMask:
    """Turn a [B, past + T] 0/1 mask (or None) into what the attention layers need."""
    # No padding: plain causal; one new query over a cache needs no mask at all. (Under
    # torch.compile the data-dependent check is skipped and the general path below runs.)
    if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all())):
        return AttentionMask(None, is_causal=query_length > 1, padding=None)
    padding = attention_mask.bool()
    if query_length == 1:
        return AttentionMask(padding[:, None, None, :], is_causal=False, padding=padding)  # [B, 1, 1, S]
    allowed = causal_padding_mask(padding, past_length, query_length)  # [B, 1, T, S]
    # A padding query with no real key before it (left padding) would softmax over nothing: let it
    # see every key instead. Its output is ignored; this only keeps it finite (no NaN in fp16).
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return AttentionMask(allowed, is_causal=False, padding=padding)


_INIT_ENABLED = [True]


def column_major(weight: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """`weight` [out, in] as a transposed view of [in, out] storage: same shape and values, other
    strides. MKL's CPU GEMM runs x @ W faster from this layout than from nn.Linear's own when there
    are few rows (decode): on the opt-125m matrices at 2 threads, the matmuls of a step took about
    0.8x the time at batch 1 and 0.66-0.83x at batch 8 (benchmarks/bench_floor.py and earlier
    runs of the same chain). `copy=False` only allocates."""
    store = weight.new_empty(weight.shape[::-1])
    if copy:
        store.copy_(weight.t())
    return store.t()


class Linear(nn.Linear):
    """nn.Linear whose matmul, while no gradient is recorded, runs on `kernel`: the one
    `from_pretrained` measured fastest on this CPU (`opt_torch.kernels.choose_linear`). Parameters,
    state_dict, training and every isinstance(nn.Linear) check are nn.Linear's."""

    kernel = "aten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernel)

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    @torch.no_grad()
    def pack(self) -> None:
        """Replace the weight by its oneDNN-packed form (`opt_torch.kernels.pack`): inference only."""
        if not self.packed:
            self.weight = nn.Parameter(pack(self.weight), requires_grad=False)

    @torch.no_grad()
    def unpack(self) -> None:
        """Back to an ordinary [out, in] parameter (training, `.to()`, loading call this)."""
        if self.packed:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=True)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear:
        self.unpack()  # dtype/device moves act on the plain tensor
        return super()._apply(fn, recurse)


@contextlib.contextmanager
def empty_weights(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Build modules with uninitialised parameters of `dtype` on `device` (for loaders that fill
    every tensor next): no init runs, so no page is touched and memory grows only as weights are
    read in. Unlike building on the meta device, this needs none of PyTorch's Python meta kernels
    (importing them costs ~75 MB of RSS)."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = {cls: cls.reset_parameters for cls in classes}
    old_dtype = torch.get_default_dtype()
    try:
        for cls in classes:
            cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
        torch.set_default_dtype(dtype)
        _INIT_ENABLED[0] = False
        with torch.device(device):
            yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn  # type: ignore[method-assign]
        torch.set_default_dtype(old_dtype)
        _INIT_ENABLED[0] = True


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_attn_implementation(name: str) -> None:
    """Raise ValueError when `name` is unknown, or when flash attention cannot run here."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is unknown; expected one of {list(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        if not torch.cuda.is_available():
            raise ValueError("attn_implementation='flash_attention_2' needs a CUDA GPU; none is available here")
        if not _flash_attn_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash_attn package (pip install flash-attn)"
            )


# ---------------------------------------------------------------- layers
class OPTAttention(nn.Module):
    """Multi-head self-attention; q is scaled by head_dim**-0.5 after its projection (bias included)."""

    def __init__(self, config: OPTConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        c, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.layer_idx = layer_idx
        self.attn_implementation = attn_implementation
        # Declared in the canonical table's (Hugging Face's) order, as in every backend, so
        # state_dict() lists keys the same way; run q, k, v.
        self.k_proj = Linear(c, c, bias=bias)
        self.v_proj = Linear(c, c, bias=bias)
        self.q_proj = Linear(c, c, bias=bias)
        self.out_proj = Linear(c, c, bias=bias)
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.qkv_proj: nn.Module | None = None  # one module for q/k/v (set by opt_torch.quantize)

    @torch.no_grad()
    def fuse_qkv(self, copy: bool = True, input_major: bool = True) -> None:
        """Store q/k/v weights (and biases) in one buffer and make the three parameters views of
        it: inference then runs one matmul instead of three, while `state_dict` keeps the canonical
        names and training still updates the same memory. The buffer is [C, 3C] (input-major, see
        `column_major`), viewed as the [3C, C] weight, or [3C, C] itself with `input_major=False`
        (`opt_torch.kernels.choose_linear` picks per CPU). `copy=False` only allocates (for loaders
        that fill the parameters next). Anything that replaces the parameters (`.to(dtype)`,
        `load_state_dict(assign=True)`) silently returns to three matmuls."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        c_out, c_in = self.q_proj.weight.shape
        if input_major:
            weight = self.q_proj.weight.new_empty(c_in, 3 * c_out).t()  # [3C, C] view of [C, 3C]
        else:
            weight = self.q_proj.weight.new_empty(3 * c_out, c_in)  # [3C, C]
        bias = self.q_proj.bias.new_empty(3 * c_out) if self.q_proj.bias is not None else None  # [3C]
        if copy:
            for i, p in enumerate(projs):
                weight[i * c_out : (i + 1) * c_out].copy_(p.weight)
                if bias is not None:
                    bias[i * c_out : (i + 1) * c_out].copy_(p.bias)
        for i, p in enumerate(projs):
            p.weight = nn.Parameter(weight[i * c_out : (i + 1) * c_out], requires_grad=p.weight.requires_grad)
            if bias is not None:
                p.bias = nn.Parameter(bias[i * c_out : (i + 1) * c_out], requires_grad=p.bias.requires_grad)
        self._qkv = (weight, bias)

    def _apply(self, fn: Any, recurse: bool = True) -> OPTAttention:
        out = super()._apply(fn, recurse)
        if self._qkv is not None and self.q_proj.weight.data_ptr() != self._qkv[0].data_ptr():
            self._qkv = None  # parameters moved or converted: drop the stale fused copy
        return out

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused q/k/v weights while the parameters still live in them (and no gradient is needed)."""
        if self._qkv is None or torch.is_grad_enabled():
            return None
        weight, bias = self._qkv
        if self.q_proj.weight.data_ptr() != weight.data_ptr() or self.v_proj.weight.dtype != weight.dtype:
            self._qkv = None
            return None
        return weight, bias

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, c = x.shape
        h, d = self.num_heads, self.head_dim
        fused = self._fused()
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(c, dim=-1)  # [B, T, 3C] -> 3 x [B, T, C]
        elif fused is not None:
            q, k, v = linear(x, *fused, self.q_proj.kernel).split(c, dim=-1)  # [B, T, 3C] -> 3 x [B, T, C]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = (q * self.scaling).view(b, t, h, d).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, h, d).transpose(1, 2)  # [B, H, T, D]
        v = v.view(b, t, h, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, H, S, D]
        dropout = self.dropout if self.training else 0.0
        weights = None
        impl = "eager" if output_attentions else self.attn_implementation
        if impl == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.allowed, dropout_p=dropout, is_causal=mask.is_causal, scale=1.0
            )  # [B, H, T, D]
            out = out.transpose(1, 2).reshape(b, t, h * d)  # [B, T, C] (C/N under tensor parallelism)
        elif impl == "eager":
            out, weights = eager_attention(q, k, v, mask.dense(t, k.shape[2], x.device), dropout, self.training)
            out = out.transpose(1, 2).reshape(b, t, h * d)
        else:
            out = flash_attention(q, k, v, mask, dropout).reshape(b, t, h * d)
        return self.out_proj(out), weights


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, dropout: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T) v with the scores in float32 (fp16/bf16 safe); q is already scaled.

    Returns the output [B, H, T, D] and the attention weights [B, H, T, S] in q's dtype.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [B, H, T, S]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout: float
) -> torch.Tensor:
    """flash_attn kernels (CUDA, fp16/bf16). q/k/v [B, H, T|S, D] -> output [B, T, H, D].

    Without padding the dense kernel runs with its bottom-right causal alignment (right for a
    cache); with padding the real tokens are packed and the varlen kernel runs.
    """
    if q.device.type != "cuda":
        raise ValueError(f"flash_attention_2 needs tensors on a CUDA device, got {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention_2 needs float16 or bfloat16 activations, got {q.dtype}")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return _flash_attention_packed(q, k, v, mask, dropout, flash_attn_func, flash_attn_varlen_func)


def _flash_attention_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout: float,
    dense_kernel: Callable[..., torch.Tensor], varlen_kernel: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The layout and (un)padding around flash_attn's two kernels (tested on CPU with stand-ins)."""
    t = q.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, T|S, H, D]
    causal = t > 1
    if mask.padding is None:
        return dense_kernel(q, k, v, dropout_p=dropout, softmax_scale=1.0, causal=causal)
    b, s = mask.padding.shape
    key_real = mask.padding  # [B, S]
    query_real = key_real[:, s - t :]  # [B, T]
    idx_k = key_real.flatten().nonzero().squeeze(-1)
    idx_q = query_real.flatten().nonzero().squeeze(-1)
    len_k, len_q = key_real.sum(-1, dtype=torch.int32), query_real.sum(-1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(len_k, 0, dtype=torch.int32), (1, 0))
    cu_q = F.pad(torch.cumsum(len_q, 0, dtype=torch.int32), (1, 0))
    h, d = q.shape[2], q.shape[3]
    out_packed = varlen_kernel(
        q.reshape(b * t, h, d)[idx_q], k.reshape(b * s, h, d)[idx_k], v.reshape(b * s, h, d)[idx_k],
        cu_q, cu_k, int(len_q.max()), int(len_k.max()),
        dropout_p=dropout, softmax_scale=1.0, causal=causal,
    )  # [real queries, H, D]
    out = q.new_zeros(b * t, h, d)
    out[idx_q] = out_packed
    return out.view(b, t, h, d)


class OPTDecoderLayer(nn.Module):
    """One decoder layer, pre-LN (most sizes) or post-LN (opt-350m) as the config says."""

    def __init__(self, config: OPTConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        c, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation = ACTIVATIONS[config.activation_function]
        self.self_attn = OPTAttention(config, layer_idx, attn_implementation)
        self.self_attn_layer_norm = nn.LayerNorm(c, elementwise_affine=affine)
        self.fc1 = Linear(c, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, c, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(c, elementwise_affine=affine)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask, cache: Cache | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pre = self.do_layer_norm_before
        h = self.self_attn_layer_norm(x) if pre else x
        h, weights = self.self_attn(h, mask, cache, output_attentions)
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if not pre:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if pre else x
        h = self.fc2(self.activation(self.fc1(h)))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if not pre:
            x = self.final_layer_norm(x)
        return x, weights


class OPTDecoder(nn.Module):
    """Embeddings, the decoder layers, the final LayerNorm and the projections."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        c, e = config.hidden_size, config.embed_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, c)
        self.project_out = Linear(c, e, bias=False) if config.has_projections else None
        self.project_in = Linear(e, c, bias=False) if config.has_projections else None
        self.final_layer_norm = (
            nn.LayerNorm(c, elementwise_affine=config.layer_norm_elementwise_affine)
            if config.has_final_layer_norm
            else None
        )
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, i, attn_implementation) for i in range(config.num_hidden_layers)
        )
        self.layerdrop = config.layerdrop
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        """Run the new tokens `input_ids` [B, T] (inputs already validated)."""
        b, t = input_ids.shape
        cache = past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, t)
            else:
                position_ids = positions_from_mask(attention_mask, past, t)  # [B, T]
        mask = build_attention_mask(attention_mask, t, past)

        x = self.embed_tokens(input_ids)  # [B, T, E]
        if self.project_in is not None:
            x = self.project_in(x)  # [B, T, C]
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)

        hidden: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            if self.training and self.layerdrop > 0 and float(torch.rand([])) < self.layerdrop:
                continue
            if checkpointing:
                x, weights = checkpoint(layer, x, mask, None, output_attentions, use_reentrant=False)
            else:
                x, weights = layer(x, mask, cache, output_attentions)
            if output_attentions:
                attentions.append(weights)

        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [B, T, E]
        if output_hidden_states:
            hidden.append(x)
        return OPTOutput(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


# ---------------------------------------------------------------- the public models
def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)
    return torch.as_tensor(np.asarray(x), device=device, dtype=dtype)


def _to_numpy(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class OPTPreTrainedModel(nn.Module):
    """What the four models share: config, input checks, weight init, loading, saving, generating."""

    head: Head = Head.BASE

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an opt_core.OPTConfig, got {type(config).__name__}")
        check_attn_implementation(attn_implementation)
        self.config = config
        self.attn_implementation = attn_implementation

    # ------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_decoder(self) -> OPTDecoder:
        """The `OPTDecoder` inside this model."""
        raise NotImplementedError

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer to "eager", "sdpa" or "flash_attention_2"."""
        check_attn_implementation(name)
        self.attn_implementation = name
        for layer in self.get_decoder().layers:
            layer.self_attn.attn_implementation = name

    @torch.no_grad()
    def optimize_layout(self, copy: bool = True, input_major: bool = True, kernel: str = "aten") -> None:
        """Lay the weights out for fast inference; `from_pretrained` does this on load, with the
        kernel and layout measured fastest on this CPU (`opt_torch.kernels.choose_linear`).

        Fuses each layer's q/k/v projections (`OPTAttention.fuse_qkv`) and, with `input_major`,
        stores every other matmul weight (and a token embedding tied to `lm_head`) input-major
        (`column_major`); `kernel` ("aten" or "onednn", see `opt_torch.kernels.linear`) is what
        every `Linear` runs when no gradient is recorded. Parameter names, shapes, values and
        training are unchanged; only strides differ. `copy=False` only allocates (a loader fills
        every tensor next)."""
        if kernel not in ("aten", "onednn"):
            raise ValueError(f"kernel={kernel!r}; expected 'aten' or 'onednn'")
        if kernel == "onednn" and input_major:
            raise ValueError("the oneDNN kernel reads nn.Linear's [out, in] layout: pass input_major=False")
        for m in self.modules():
            if isinstance(m, Linear):
                m.kernel = kernel
        for layer in self.get_decoder().layers:
            layer.self_attn.fuse_qkv(copy, input_major)
        if not input_major:
            return
        fused = {id(getattr(layer.self_attn, name).weight) for layer in self.get_decoder().layers
                 for name in ("q_proj", "k_proj", "v_proj")}
        replaced: dict[int, nn.Parameter] = {}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in fused:
                w = m.weight
                if id(w) not in replaced:
                    replaced[id(w)] = nn.Parameter(column_major(w, copy), requires_grad=w.requires_grad)
                m.weight = replaced[id(w)]
        embed = self.get_decoder().embed_tokens
        if id(embed.weight) in replaced:  # tied to lm_head: keep one parameter
            embed.weight = replaced[id(embed.weight)]

    @torch.no_grad()
    def pack_weights(self) -> None:
        """Put the decoder layers' matmul weights (and project_in/out) into oneDNN's packed format
        (`Linear.pack`), in place of the plain tensors: inference only, on request (or
        `OPT_TORCH_LINEAR=onednn_packed` at load), since packed weights are opaque tensors. On an
        AMD EPYC it sped batch-8 fp32 decode matmuls up ~1.6x over oneDNN on plain weights. q/k/v
        are packed one by one and their fused buffer is released, so memory stays at one copy of
        the weights. The heads and the tied
        lm_head stay plain. `train()`, `unpack_weights()`, `.to()` and `load_state_dict` unpack;
        `state_dict()` writes the plain values either way."""
        from opt_torch.quantize import release_freed_memory

        decoder = self.get_decoder()
        for layer in decoder.layers:
            for m in layer.modules():
                if isinstance(m, Linear):
                    m.pack()
            layer.self_attn._qkv = None
            release_freed_memory()  # this layer's plain pages back to the OS before the next is packed
        for m in (decoder.project_in, decoder.project_out):
            if m is not None:
                m.pack()
        release_freed_memory()

    def unpack_weights(self) -> None:
        """Plain [out, in] parameters again (see `pack_weights`)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.unpack()

    def train(self, mode: bool = True) -> OPTPreTrainedModel:
        if mode:  # a training model keeps ordinary parameters
            self.unpack_weights()
        return super().train(mode)

    def fuse_qkv(self) -> None:
        """Fuse each layer's q/k/v projections only (see `OPTAttention.fuse_qkv`)."""
        for layer in self.get_decoder().layers:
            layer.self_attn.fuse_qkv()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass instead of storing its activations (training)."""
        self.get_decoder().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.get_decoder().gradient_checkpointing = False

    def num_parameters(self) -> int:
        """Distinct parameters (a tied tensor counts once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, module: nn.Module | None = None) -> None:
        """Hugging Face's init: Linear/Embedding weights N(0, init_std), biases 0, LayerNorm 1/0,
        the padding row of the token table 0. Applies to `module` or to the whole model."""
        if not _INIT_ENABLED[0]:
            return
        std = self.config.init_std
        for m in (module or self).modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with the token embedding (causal LM with tied embeddings)."""

    # ------------------------------------------------------------ inputs
    def _prepare_inputs(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, past_key_values: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Numpy or torch -> tensors on the model's device, after `validate_inputs` (clear errors)."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError(
                f"past_key_values must be an opt_torch cache (DynamicCache or StaticCache), got "
                f"{type(past_key_values).__name__}; wrap legacy tuples with DynamicCache.from_legacy"
            )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        ids_np = _to_numpy(input_ids)
        mask_np = _to_numpy(attention_mask)
        validate_inputs(ids_np, mask_np, self.config, past)
        device = self.device
        ids = _as_tensor(input_ids, device, torch.long)
        mask = _as_tensor(attention_mask, device, torch.long)
        pos = _as_tensor(position_ids, device, torch.long)
        if pos is not None and tuple(pos.shape) != tuple(ids.shape):
            raise ValueError(f"position_ids has shape {tuple(pos.shape)}; expected {tuple(ids.shape)} like input_ids")
        if past_key_values is not None and past_key_values.max_length is not None:
            if past + ids.shape[1] > past_key_values.max_length:
                raise ValueError(
                    f"{past} cached + {ids.shape[1]} new tokens do not fit the StaticCache "
                    f"(max_length {past_key_values.max_length})"
                )
        return ids, mask, pos

    def _run_decoder(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        validate: bool = True,
    ) -> tuple[OPTOutput, torch.Tensor]:
        if validate:
            input_ids, attention_mask, position_ids = self._prepare_inputs(
                input_ids, attention_mask, position_ids, past_key_values
            )
        use_cache = self.config.use_cache and not self.training if use_cache is None else use_cache
        if self.get_decoder().gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        out = self.get_decoder()(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if use_cache else None,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return out, input_ids

    # ------------------------------------------------------------ IO and generation
    @classmethod
    def empty(cls, config: OPTConfig, dtype: torch.dtype, device: torch.device | str,
              attn_implementation: str = "sdpa") -> OPTPreTrainedModel:
        """The model on uninitialised storage of `dtype` on `device`, in its optimised layout, for
        loaders that fill every tensor next (`opt_torch.io`)."""
        from opt_torch.kernels import choose_linear

        on_cpu = torch.device(device).type == "cpu"
        choice = choose_linear(config.hidden_size, config.ffn_dim, dtype) if on_cpu else "aten"  # measured here
        with empty_weights(dtype, device):
            model = cls(config, attn_implementation=attn_implementation)
            model.optimize_layout(copy=False, input_major=choice == "aten_input_major",
                                  kernel="aten" if choice.startswith("aten") else "onednn")
        model.pack_on_load = choice == "onednn_packed"  # `opt_torch.io` packs once the weights are in
        return model

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: Any = None,
        config: OPTConfig | None = None,
        format: str | None = None,
        revision: str | None = None,
        allow_non_finite: bool = False,
        quantize: str | None = None,
        **backend_options: Any,
    ) -> OPTPreTrainedModel:
        from opt_torch.io import from_pretrained

        return from_pretrained(cls, name_or_path, dtype=dtype, config=config, format=format, revision=revision,
                               allow_non_finite=allow_non_finite, quantize=quantize, **backend_options)

    from_pretrained.__func__.__doc__ = FROM_PRETRAINED_DOC + """
torch options: `device` (where the parameters live; default CPU), `attn_implementation` ("eager",
"sdpa" (default) or "flash_attention_2"), `torch_dtype` (Hugging Face's old name for `dtype`; a
`torch.dtype` is accepted for either), `tp_plan="auto"` / `device_mesh` (tensor parallelism under
torchrun, `opt_torch.parallel`), `calibration` (w8a8: a text file for SmoothQuant factors).
"""

    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        max_shard_size: int | str = DEFAULT_SHARD_BYTES,
        formats: Iterable[str] | None = None,
        **backend_options: Any,
    ) -> list[Path]:
        from opt_torch.io import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, formats=formats, **backend_options)

    save_pretrained.__doc__ = SAVE_PRETRAINED_DOC + """
torch options: none; a quantized model is refused (save the float model, pass quantize= when loading).
"""


class OPTModel(OPTPreTrainedModel):
    """The bare decoder; returns `.last_hidden_state` [B, T, E]."""

    head = Head.BASE

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.decoder = OPTDecoder(config, attn_implementation)
        self.init_weights()

    def get_decoder(self) -> OPTDecoder:
        return self.decoder

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions,
        )
        return out


class _WithDecoder(OPTPreTrainedModel):
    """A task head on top of `self.model` (an `OPTModel`), as Hugging Face nests them."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.model = OPTModel(config, attn_implementation)

    def get_decoder(self) -> OPTDecoder:
        return self.model.decoder


class OPTForCausalLM(_WithDecoder):
    """Decoder + `lm_head` (no bias, tied to the token embedding unless the config unties it)."""

    head = Head.CAUSAL_LM

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.lm_head = Linear(config.embed_dim, config.vocab_size, bias=False)
        self.init_weights(self.lm_head)
        self.tie_weights()
        # generate's defaults; from_pretrained replaces them with the folder's generation_config.json
        self.generation_config = GenerationConfig.from_model_config(config)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
        validate: bool = True,
    ) -> OPTOutput:
        """Logits [B, T, V] (the last `logits_to_keep` positions only when > 0).

        `labels` [B, T] (-100 = ignore) gives `.loss`: mean cross-entropy of token t+1 given 0..t.
        `validate=False` skips the input checks (generation loops, whose inputs are already checked).
        """
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions, validate,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        out.logits = self.lm_head(h)  # [B, T, V]
        if labels is not None:
            labels = _as_tensor(labels, out.logits.device, torch.long)
            out.loss = causal_lm_loss(out.logits, labels)
        return out

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        streamer: Any = None,
        early_stopping: bool | str | None = None,
        num_return_sequences: int | None = None,
        penalty_alpha: float | None = None,
    ) -> torch.Tensor:
        return generation.generate(
            self, input_ids, attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
            length_penalty=length_penalty, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            seed=seed, streamer=streamer, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences, penalty_alpha=penalty_alpha,
        )

    generate.__doc__ = GENERATE_DOC


class OPTForSequenceClassification(_WithDecoder):
    """Decoder + `score`, read at the right-most non-pad token of each row (left or right padding)."""

    head = Head.SEQUENCE_CLASSIFICATION

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.score = Linear(config.embed_dim, config.num_labels, bias=False)
        self.init_weights(self.score)

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        """Logits [B, L]; `labels` gives `.loss` by `config.problem_type` (inferred like Hugging
        Face when None: one label -> regression, integer labels -> single-label, else multi-label)."""
        out, ids = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions,
        )
        scores = self.score(out.last_hidden_state)  # [B, T, L]
        if self.config.pad_token_id is None and ids.shape[0] != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id to find each row's end")
        last = last_non_pad_indices(ids, self.config.pad_token_id)  # [B]
        out.logits = scores[torch.arange(ids.shape[0], device=ids.device), last]  # [B, L]
        if labels is not None:
            out.loss = sequence_classification_loss(out.logits, _as_tensor(labels, out.logits.device), self.config)
        return out


class OPTForQuestionAnswering(_WithDecoder):
    """Decoder + `qa_outputs` (with bias) -> start and end logits [B, T]."""

    head = Head.QUESTION_ANSWERING

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.qa_outputs = Linear(config.embed_dim, 2)
        self.init_weights(self.qa_outputs)

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        start_positions: Any = None,
        end_positions: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        """`start_positions`/`end_positions` [B] give `.loss`: the mean of the start and end
        cross-entropies, positions clamped to [0, T] and T ignored (as Hugging Face)."""
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions,
        )
        both = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        out.start_logits = both[..., 0].contiguous()
        out.end_logits = both[..., 1].contiguous()
        if start_positions is not None and end_positions is not None:
            out.loss = question_answering_loss(
                out.start_logits, out.end_logits,
                _as_tensor(start_positions, both.device, torch.long),
                _as_tensor(end_positions, both.device, torch.long),
            )
        return out


MODEL_CLASSES: dict[Head, type[OPTPreTrainedModel]] = {
    Head.BASE: OPTModel,
    Head.CAUSAL_LM: OPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassification,
    Head.QUESTION_ANSWERING: OPTForQuestionAnswering,
}

