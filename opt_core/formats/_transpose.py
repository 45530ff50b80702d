"""Fast bit-exact 2-D transposes and a reusable scratch buffer, shared by the Keras (`tf_h5`) and
Flax (`flax_msgpack`) readers and by the converter's kernel writers.

`opt_core.layout.transpose` is the specification; `fast_transpose` computes the same bits faster
on large half-precision matrices.
"""

from __future__ import annotations

import numpy as np

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class Scratch:
    """One reusable buffer, grown to the largest request. Reading each tensor into fresh memory
    costs a page fault per 4 KiB page (the allocator hands large blocks back to the kernel on
    free); reusing one buffer halves the cost of a streamed read. An array from `array()` is valid
    until the next call."""

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` and `dtype` inside the buffer (contents undefined)."""
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self._buf is None or self._buf.nbytes < n:
            self._buf = None  # free the old one first
            self._buf = np.empty(max(n, 1), dtype=np.uint8)
        return self._buf[:n].view(dtype).reshape(shape)


def fast_transpose(x: np.ndarray, tile: int = 256, out: np.ndarray | None = None) -> np.ndarray:
    """`np.ascontiguousarray(x.T)` for a 2-D array, bit for bit (its own inverse), several times
    faster on large half-precision matrices: NumPy's strided copy of float16/bfloat16 is slow and
    cache-unfriendly, so the copy goes tile by tile over an unsigned-integer view of the same bits.

    Args:
        x: a 2-D array [rows, cols].
        out: optional C-contiguous [cols, rows] array of x's dtype (or itemsize) to fill.
    Returns:
        The [cols, rows] transpose (`out` when given).
    Raises:
        ValueError: `x` is not 2-D, or `out` has the wrong shape.
    """
    if x.ndim != 2:
        raise ValueError(f"fast_transpose expects a 2-D array, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if out is not None and (tuple(out.shape) != (cols, rows) or out.dtype.itemsize != x.dtype.itemsize):
        raise ValueError(f"fast_transpose: out is {tuple(out.shape)} {out.dtype}, needs {(cols, rows)} {x.dtype}")
    bits = x.view(_UINT[x.dtype.itemsize]) if x.dtype.itemsize in _UINT else x
    dst = np.empty((cols, rows), dtype=bits.dtype) if out is None else out.view(bits.dtype)
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            dst[j : j + tile, i : i + tile] = bits[i : i + tile, j : j + tile].T  # (tile, tile) block
    return dst.view(x.dtype)


def kernel_layout(x: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """A 2-D canonical [out, in] weight as a C-contiguous [in, out] kernel (`x.T`), bit for bit.

    A view when `x`'s memory already is [in, out] (Fortran order), else a `fast_transpose` copy,
    placed in `scratch` when given (then valid until scratch's next use)."""
    if x.T.flags.c_contiguous:
        return x.T
    out = scratch.array((x.shape[1], x.shape[0]), x.dtype) if scratch is not None else None
    return fast_transpose(x, out=out)
