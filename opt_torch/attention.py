"""OPT's self-attention in PyTorch: the masks built once per call, the attention module and its three
paths (eager, PyTorch's SDPA, flash-attention-2). Shape letters as in `opt_torch.modeling`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opt_core import OPTConfig
from opt_torch.cache import Cache
from opt_torch.kernels import linear
from opt_torch.layout import Linear, fuse_qkv_views

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


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


# ---------------------------------------------------------------- the attention module and its paths
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
        `opt_torch.layout.column_major`), viewed as the [3C, C] weight, or [3C, C] itself with `input_major=False`
        (`opt_torch.kernels.choose_linear` picks per CPU). `copy=False` only allocates (for loaders
        that fill the parameters next). Anything that replaces the parameters (`.to(dtype)`,
        `load_state_dict(assign=True)`) silently returns to three matmuls."""
        self._qkv = fuse_qkv_views(self.q_proj, self.k_proj, self.v_proj, copy, input_major)

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

