"""Reduced-precision inference for opt_flax: the same `quantize=` options as opt_torch, as a module swap.

- "int8": weight-only. Each `nnx.Linear` kernel [in, out] is stored int8 with one symmetric scale
  per output channel; the call is `(x @ q.astype(dtype)) * scale + bias`, so the int8 -> float
  conversion sits inside the jitted computation next to the dot (whether XLA fuses it into the dot
  or writes the converted kernel out first is XLA's choice; on CPU it converts first, so this saves
  memory, not time: see BENCHMARKS.md).
- "w8a8": int8 weights as above and int8 activations, symmetric per token (max |x| / 127 per row),
  multiplied in int32 by `lax.dot_general(preferred_element_type=int32)` and rescaled.

The token embedding (and the tied output projection) stay in the model's dtype. A quantized model
is for inference; `dict(model.quantization)` says what was done.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core.quantization import QUANTIZE_MODES, check_quantize, quantize_per_channel

MODES = QUANTIZE_MODES["flax"]


def check_mode(mode: str | None) -> str | None:
    """`mode` if it is None or one of MODES; ValueError otherwise (`opt_core.quantization`)."""
    return check_quantize(mode, "flax")


class QuantizedLinear(nnx.Module):
    """An `nnx.Linear` with an int8 kernel [in, out] and float32 per-output scales."""

    def __init__(self, linear: nnx.Linear, mode: str):
        q, scale = quantize_per_channel(np.asarray(linear.kernel[...]))
        self.mode = mode
        self.dtype = linear.dtype or jnp.float32
        self.qkernel = nnx.Variable(jnp.asarray(q))  # int8 [in, out]
        self.scale = nnx.Variable(jnp.asarray(scale))  # [out]
        self.bias = None if linear.bias is None else nnx.Variable(jnp.asarray(linear.bias[...]))

    def __call__(self, x: jax.Array) -> jax.Array:
        q, scale = self.qkernel[...], self.scale[...]
        if self.mode == "int8":
            y = jnp.einsum("...i,io->...o", x.astype(self.dtype), q.astype(self.dtype)) * scale.astype(self.dtype)
        else:
            xf = x.astype(jnp.float32)
            x_scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-8) / 127.0  # [..., 1] per token
            xq = jnp.clip(jnp.round(xf / x_scale), -127, 127).astype(jnp.int8)
            acc = jax.lax.dot_general(xq, q, (((xq.ndim - 1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.int32)  # [..., out]
            y = (acc.astype(jnp.float32) * x_scale * scale).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def quantize_model(model: Any, mode: str) -> Any:
    """Swap every `nnx.Linear` of the decoder layers, the projections and an untied lm_head for a
    `QuantizedLinear` (in place); returns the model."""
    check_mode(mode)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({dict(model.quantization)['mode']})")
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attn, name, QuantizedLinear(getattr(attn, name), mode))
        layer.fc1 = QuantizedLinear(layer.fc1, mode)
        layer.fc2 = QuantizedLinear(layer.fc2, mode)
    for name in ("project_in", "project_out"):
        if isinstance(getattr(decoder, name, None), nnx.Linear):
            setattr(decoder, name, QuantizedLinear(getattr(decoder, name), mode))
    if isinstance(getattr(model, "lm_head", None), nnx.Linear):
        model.lm_head = QuantizedLinear(model.lm_head, mode)
    kernel = "XLA dot, int8 kernel converted in the graph" if mode == "int8" else "XLA int8 x int8 -> int32 dot"
    # A tuple of pairs, not a dict: nnx keeps plain attributes in the (hashed) graph definition.
    model.quantization = (("mode", mode), ("kernel", kernel), ("embeddings", False))
    return model


def quantize_loaded(model: Any, mode: str | None) -> Any:
    """What `from_pretrained(..., quantize=mode)` runs after loading; None returns the model as it is."""
    return model if check_mode(mode) is None else quantize_model(model, mode)
