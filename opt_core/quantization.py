"""The `quantize=` modes each backend offers, and the one check of that argument (used by every
backend's `from_pretrained`, so a bad value reads the same everywhere)."""

from __future__ import annotations

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
