"""Where opt_torch's weights live in memory: layouts and packed forms for fast CPU inference, and
building a model on uninitialised storage for loaders.

None of this changes what a model computes or how it saves: parameter names, shapes and values stay
Hugging Face's, only strides, storage sharing and (on request) oneDNN's opaque packed format differ.
Which layout is fastest is measured per CPU in `opt_torch.kernels`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from opt_core.platform import release_freed_memory
from opt_torch.kernels import linear, pack

# (dtype, device) while `empty_weights` builds a model, else None. A context variable, not a patch of
# nn.Linear & co.: a model built in another thread (or asyncio task) at the same time is unaffected.
_EMPTY: contextvars.ContextVar[tuple[torch.dtype, torch.device] | None] = contextvars.ContextVar(
    "opt_torch_empty_weights", default=None
)


def building_empty() -> bool:
    """Whether modules are being built inside `empty_weights` (their init must not run)."""
    return _EMPTY.get() is not None


def _factory_kwargs(device: Any, dtype: Any) -> dict[str, Any]:
    empty = _EMPTY.get()
    if empty is None:
        return {"device": device, "dtype": dtype}
    return {"device": empty[1] if device is None else device, "dtype": empty[0] if dtype is None else dtype}


@contextlib.contextmanager
def empty_weights(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Build opt_torch's modules with uninitialised parameters of `dtype` on `device` (for loaders that
    fill every tensor next): no init runs, so no page is touched and memory grows only as weights are
    read in. Unlike building on the meta device, this needs none of PyTorch's Python meta kernels
    (importing them costs ~75 MB of RSS). Only this package's `Linear`, `Embedding` and `LayerNorm`
    (what the models are made of) obey it, and only in the current thread or task: nothing global
    (default dtype, device, torch.nn's classes) is changed."""
    token = _EMPTY.set((dtype, torch.device(device)))
    try:
        yield
    finally:
        _EMPTY.reset(token)


class Embedding(nn.Embedding):
    """nn.Embedding that `empty_weights` can build without initialising."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 device: Any = None, dtype: Any = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, **_factory_kwargs(device, dtype))

    def reset_parameters(self) -> None:
        if not building_empty():
            super().reset_parameters()


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that `empty_weights` can build without initialising."""

    def __init__(self, normalized_shape: int, elementwise_affine: bool = True, device: Any = None, dtype: Any = None):
        super().__init__(normalized_shape, elementwise_affine=elementwise_affine, **_factory_kwargs(device, dtype))

    def reset_parameters(self) -> None:
        if not building_empty():
            super().reset_parameters()


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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None):
        super().__init__(in_features, out_features, bias=bias, **_factory_kwargs(device, dtype))

    def reset_parameters(self) -> None:
        if not building_empty():
            super().reset_parameters()

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


@torch.no_grad()
def fuse_qkv_views(
    q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, copy: bool = True, input_major: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store q/k/v weights (and biases) in one buffer and make the three parameters views of it;
    returns the fused (weight [3C, C], bias [3C] or None) for one matmul instead of three.

    The buffer is [C, 3C] (input-major, see `column_major`), viewed as the [3C, C] weight, or
    [3C, C] itself with `input_major=False`. `copy=False` only allocates (for loaders that fill the
    parameters next). `state_dict` keeps the canonical names and training updates the same memory."""
    projs = (q_proj, k_proj, v_proj)
    c_out, c_in = q_proj.weight.shape
    if input_major:
        weight = q_proj.weight.new_empty(c_in, 3 * c_out).t()  # [3C, C] view of [C, 3C]
    else:
        weight = q_proj.weight.new_empty(3 * c_out, c_in)  # [3C, C]
    bias = q_proj.bias.new_empty(3 * c_out) if q_proj.bias is not None else None  # [3C]
    if copy:
        for i, p in enumerate(projs):
            weight[i * c_out : (i + 1) * c_out].copy_(p.weight)
            if bias is not None:
                bias[i * c_out : (i + 1) * c_out].copy_(p.bias)
    for i, p in enumerate(projs):
        p.weight = nn.Parameter(weight[i * c_out : (i + 1) * c_out], requires_grad=p.weight.requires_grad)
        if bias is not None:
            p.bias = nn.Parameter(bias[i * c_out : (i + 1) * c_out], requires_grad=p.bias.requires_grad)
    return weight, bias


@torch.no_grad()
def optimize_layout(model: Any, copy: bool = True, input_major: bool = True, kernel: str = "aten") -> None:
    """`OPTPreTrainedModel.optimize_layout` (see there)."""
    if kernel not in ("aten", "onednn"):
        raise ValueError(f"kernel={kernel!r}; expected 'aten' or 'onednn'")
    if kernel == "onednn" and input_major:
        raise ValueError("the oneDNN kernel reads nn.Linear's [out, in] layout: pass input_major=False")
    for m in model.modules():
        if isinstance(m, Linear):
            m.kernel = kernel
    for layer in model.get_decoder().layers:
        layer.self_attn.fuse_qkv(copy, input_major)
    if not input_major:
        return
    fused = {id(getattr(layer.self_attn, name).weight) for layer in model.get_decoder().layers
             for name in ("q_proj", "k_proj", "v_proj")}
    replaced: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in fused:
            w = m.weight
            if id(w) not in replaced:
                replaced[id(w)] = nn.Parameter(column_major(w, copy), requires_grad=w.requires_grad)
            m.weight = replaced[id(w)]
    embed = model.get_decoder().embed_tokens
    if id(embed.weight) in replaced:  # tied to lm_head: keep one parameter
        embed.weight = replaced[id(embed.weight)]


@torch.no_grad()
def pack_weights(model: Any) -> None:
    """`OPTPreTrainedModel.pack_weights` (see there)."""
    decoder = model.get_decoder()
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


def unpack_weights(model: Any) -> None:
    """`OPTPreTrainedModel.unpack_weights` (see there)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.unpack()
