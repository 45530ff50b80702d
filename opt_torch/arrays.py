"""NumPy <-> torch without copies (bfloat16 through ml_dtypes), for the loaders (`io`, `parallel`)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (bfloat16 as ml_dtypes.bfloat16), no copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_tensor(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing `x`'s memory (bfloat16 through a bit view)."""
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)
