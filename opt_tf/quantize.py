"""Reduced-precision inference for opt_tf: the same `quantize=` options as opt_torch, as a layer swap.

- "int8": weight-only. Each `Linear` kernel [in, out] is stored int8 (a non-trainable variable, so
  XLA cannot fold the conversion into a float constant) with one symmetric scale per output
  channel; the call is `(x @ cast(q)) * scale + bias`: the conversion happens inside the compiled
  step, beside the matmul (whether XLA fuses it into the dot is its choice: on CPU it converts
  first, which saves memory, not time; see BENCHMARKS.md).
- "w8a8": int8 weights as above and int8 activations, symmetric per token (max |x| / 127 per row),
  multiplied in int32 (`tf.linalg.matmul(..., output_type=tf.int32)`) and rescaled.

The token embedding (and the tied output projection) stay float32. Inference only;
`model.quantization` says what was done.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import keras
import tensorflow as tf

from opt_core.quantization import QUANTIZE_MODES, check_quantize, quantize_per_channel

MODES = QUANTIZE_MODES["tf"]


def check_mode(mode: str | None) -> str | None:
    """`mode` if it is None or one of MODES; ValueError otherwise (`opt_core.quantization`)."""
    return check_quantize(mode, "tf")


class QuantizedLinear(keras.layers.Layer):
    """A `Linear` with an int8 kernel [in, out] and float32 per-output scales."""

    def __init__(self, linear: Any, mode: str, **kwargs: Any):
        super().__init__(name=linear.name, **kwargs)
        q, scale = quantize_per_channel(linear.kernel.numpy())
        self.mode = mode
        self.qkernel = tf.Variable(q, trainable=False, name="qkernel")  # int8 [in, out]
        self.scale = tf.Variable(scale, trainable=False, name="scale")  # [out]
        self.qbias = None if linear.bias is None else tf.Variable(linear.bias.numpy(), trainable=False, name="bias")
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        lead = tf.shape(x)[:-1]
        x2 = tf.reshape(x, [-1, x.shape[-1]])  # [N, in]
        if self.mode == "int8":
            y = tf.linalg.matmul(x2, tf.cast(self.qkernel, x.dtype)) * tf.cast(self.scale, x.dtype)
        else:
            xf = tf.cast(x2, tf.float32)
            x_scale = tf.maximum(tf.reduce_max(tf.abs(xf), axis=-1, keepdims=True), 1e-8) / 127.0  # [N, 1]
            xq = tf.cast(tf.clip_by_value(tf.round(xf / x_scale), -127.0, 127.0), tf.int8)
            acc = tf.linalg.matmul(xq, self.qkernel, output_type=tf.int32)  # [N, out]
            y = tf.cast(tf.cast(acc, tf.float32) * x_scale * self.scale, x.dtype)
        if self.qbias is not None:
            y = y + tf.cast(self.qbias, x.dtype)
        return tf.reshape(y, tf.concat([lead, [self.scale.shape[0]]], 0))


def _is_linear(layer: Any) -> bool:
    """An opt_tf `Linear` (kernel [in, out] and bias), by its variables: importing opt_tf.modeling
    here would close an import cycle (modeling -> io -> quantize -> modeling)."""
    return layer is not None and not isinstance(layer, QuantizedLinear) and hasattr(layer, "kernel")


def quantize_model(model: Any, mode: str) -> Any:
    """Swap every `Linear` of the decoder layers, the projections and an untied lm_head for a
    `QuantizedLinear` (in place); returns the model. These are the layers of
    `opt_core.quantization.W8A8["tf"]`."""
    check_mode(mode)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['mode']})")
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attn, name, QuantizedLinear(getattr(attn, name), mode))
        layer.fc1 = QuantizedLinear(layer.fc1, mode)
        layer.fc2 = QuantizedLinear(layer.fc2, mode)
    for name in ("project_in", "project_out"):
        if _is_linear(getattr(decoder, name, None)):
            setattr(decoder, name, QuantizedLinear(getattr(decoder, name), mode))
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, keras.Variable):  # an untied head is a bare [E, V] kernel: quantized like a Linear
        model.lm_head = QuantizedLinear(SimpleNamespace(name="lm_head", kernel=lm_head, bias=None), mode)
    model.quantization = {"mode": mode, "embeddings": False,
                          "kernel": "XLA matmul of the int8 kernel cast in the graph" if mode == "int8"
                          else "int8 x int8 -> int32 matmul"}
    return model


def quantize_loaded(model: Any, mode: str | None) -> Any:
    """What `from_pretrained(..., quantize=mode)` runs after loading; None returns the model as it is."""
    return model if check_mode(mode) is None else quantize_model(model, mode)
