"""Any framework's array as NumPy, without importing a framework (the one helper the backends'
input checks, the CLI, opt_verify, the benchmarks and the tests share)."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """`x` (a torch tensor on any device, a TensorFlow or JAX array, NumPy, a list) as a NumPy
    array of the same values and dtype, except bfloat16 (which NumPy lacks), which becomes float32.

    A torch tensor is detached and copied to the CPU first; the others go through `np.asarray`
    (`__array__`), which copies a device array to host memory.
    """
    if type(x).__module__.startswith("torch"):  # torch.Tensor, nn.Parameter: no torch import needed
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    arr = np.asarray(x)
    return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr
