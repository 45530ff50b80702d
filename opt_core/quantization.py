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
