"""The `quantize=` modes each backend offers, and the one check of that argument (used by every
backend's `from_pretrained`, so a bad value reads the same everywhere)."""

from __future__ import annotations

import numpy as np

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
