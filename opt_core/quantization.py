"""The `quantize=` modes each backend offers, and the one check of that argument (used by every
backend's `from_pretrained`, so a bad value reads the same everywhere); what "w8a8" means in each
backend (`W8A8`), with the NumPy definition of the XLA backends' int8 product; the NumPy per-channel
weight quantization TF and Flax share; the one refusal to save a quantized model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# SmoothQuant factors (opt_torch w8a8) shipped beside a model's weights: not weights themselves.
SMOOTHING_FILE = "smoothquant.safetensors"

QUANTIZE_MODES: dict[str, tuple[str, ...]] = {
    "torch": ("int8", "int4", "w8a8"),  # int4: PyTorch's CPU int4 kernel, no XLA counterpart here
    "tf": ("int8", "w8a8"),
    "flax": ("int8", "w8a8"),
}


def check_quantize(mode: str | None, backend: str) -> str | None:
    """`mode` if it is None or one of `backend`'s modes; otherwise a ValueError that says which
    backends have it, or that no backend does."""
    offered = QUANTIZE_MODES[backend]
    if mode is None or mode in offered:
        return mode
    others = [f"opt_{b}" for b, modes in QUANTIZE_MODES.items() if mode in modes]
    if others:
        raise ValueError(f"quantize={mode!r} is {', '.join(others)} only; opt_{backend} has {list(offered)}")
    raise ValueError(f"quantize={mode!r} is unknown; expected None or one of {list(offered)}")


def refuse_quantized_save(model: object) -> None:
    """Raise ValueError when `model` was quantized (`model.quantization` set by any backend's
    `quantize_model`): the int8/int4 tensors have no place in the float checkpoint formats, so a
    save would either fail deep inside the writer or silently write something no loader reads.
    Every backend's `save_pretrained` calls this first, so the refusal reads the same everywhere."""
    state = getattr(model, "quantization", None)
    if state:
        mode = dict(state).get("mode", "?")  # a dict (torch, TF) or a tuple of pairs (Flax)
        raise ValueError(
            f"this model is quantized (quantize={mode!r}) and cannot be saved; save the float model "
            "and pass quantize= when loading it"
        )


def quantize_per_channel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of a kernel in the [in, out] layout (TF and Flax):
    (int8 [in, out], float32 scale [out]) with kernel ~= q * scale, scale = max |column| / 127.
    An all-zero column gets scale 1 (its q is all zeros either way)."""
    k = np.asarray(kernel, dtype=np.float32)
    scale = np.abs(k).max(axis=0) / 127.0  # [out]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(k / scale), -127, 127).astype(np.int8), scale


# ---------------------------------------------------------------- what "w8a8" is in each backend
@dataclass(frozen=True)
class W8A8Scheme:
    """One backend's `quantize="w8a8"`: how weights and activations are rounded, and where."""

    weights: str
    activations: str
    layers: tuple[str, ...]  # the matmuls swapped, as canonical module names ("{i}" = every layer)
    embeddings: str  # the token table (and a tied lm_head)


_LAYER_MATMULS = ("decoder.layers.{i}.self_attn.q_proj", "decoder.layers.{i}.self_attn.k_proj",
                  "decoder.layers.{i}.self_attn.v_proj", "decoder.layers.{i}.self_attn.out_proj",
                  "decoder.layers.{i}.fc1", "decoder.layers.{i}.fc2", "decoder.project_in", "decoder.project_out",
                  "lm_head (untied)")
_PER_CHANNEL = "int8, symmetric, one scale per output channel (max |w| / 127)"

# The weights and the layers are the same everywhere; the activations and the token table are not,
# and README.md ("quantize= in each backend") gives the reason and the measured cost of each.
W8A8: dict[str, W8A8Scheme] = {
    "torch": W8A8Scheme(
        weights=_PER_CHANNEL,
        activations="uint8, asymmetric (scale and zero point from min/max), one scale per call: per token "
                    "for a one-token decode step, per tensor over a prompt or a batch (PyTorch's "
                    "quantized::linear_dynamic, fbgemm/x86/onednn); optional SmoothQuant factors",
        layers=_LAYER_MATMULS,
        embeddings="int8 rows, one scale per vocabulary entry; a tied lm_head reads the same int8 table",
    ),
    **{b: W8A8Scheme(
        weights=_PER_CHANNEL,
        activations="int8, symmetric, one scale per token (max |x| / 127 over each row), "
                    "int8 x int8 -> int32 dot, rescaled by token scale x channel scale (`w8a8_linear`)",
        layers=_LAYER_MATMULS,
        embeddings="kept in the model's float dtype (a tied lm_head too)",
    ) for b in ("tf", "flax")},
}


def quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of `x` [N, in]: (int8 [N, in], float32 scale [N, 1]), scale =
    max |row| / 127 (at least 1e-8 / 127, so an all-zero row stays zero)."""
    xf = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(xf).max(axis=-1, keepdims=True), np.float32(1e-8)) / np.float32(127.0)
    return np.clip(np.round(xf / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def w8a8_linear(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The TF/Flax w8a8 matmul, defined in NumPy: x [N, in] float, kernel [in, out] float ->
    float32 [N, out] = (q_x @ q_w in int32) * token scale * channel scale + bias, with q_w, channel
    scale from `quantize_per_channel` and q_x, token scale from `quantize_per_token`."""
    qw, w_scale = quantize_per_channel(kernel)
    qx, x_scale = quantize_per_token(x)
    acc = qx.astype(np.int32) @ qw.astype(np.int32)  # [N, out], exact
    y = acc.astype(np.float32) * x_scale * w_scale
    return y if bias is None else y + np.asarray(bias, np.float32)

# The model dtypes each backend's quantized models compute in, where that is not every dtype it builds:
# opt_tf's int8 matmuls produce float32, which a float16/bfloat16 Keras model cannot mix into its
# BatchMatMul, so the combination is refused before any weight is read.
QUANTIZE_DTYPES: dict[str, tuple[str, ...]] = {"tf": ("float32",)}


def check_quantize_dtype(mode: str | None, backend: str, dtype: str) -> None:
    """ValueError when `backend` cannot run `quantize=mode` in a model of `dtype` (a dtype name)."""
    allowed = QUANTIZE_DTYPES.get(backend)
    if mode is not None and allowed is not None and dtype not in allowed:
        raise ValueError(f"quantize={mode!r} in opt_{backend} needs dtype {' or '.join(allowed)} (its int8 matmuls "
                         f"compute in float32), not {dtype}; drop dtype= or quantize=")
