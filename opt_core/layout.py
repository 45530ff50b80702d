"""Pure layout transforms between checkpoint formats, each beside its inverse.

Every function takes and returns NumPy-compatible arrays and never copies more than it must.
The tests check `inverse(f(x)) == x` bit for bit for each pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from opt_core.params import Layout


# ---------------------------------------------------------------- framework layouts
def transpose(x: np.ndarray) -> np.ndarray:
    """[out, in] (torch Linear) <-> [in, out] (Keras / Flax Dense kernel). Its own inverse."""
    if x.ndim != 2:
        raise ValueError(f"transpose expects a 2-D weight, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x.T)


def to_layout(x: np.ndarray, layout: Layout) -> np.ndarray:
    """Canonical (torch) layout -> a framework's layout."""
    return transpose(x) if layout is Layout.TRANSPOSE else x


def from_layout(x: np.ndarray, layout: Layout) -> np.ndarray:
    """A framework's layout -> canonical (torch) layout. Inverse of `to_layout`."""
    return transpose(x) if layout is Layout.TRANSPOSE else x


# ---------------------------------------------------------------- fused q/k/v (metaseq)
QKV_ORDER = ("k", "v", "q")  # metaseq fuses in K, V, Q order, not Q, K, V


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Stack separate q/k/v weights (or biases) on dim 0 in metaseq's K, V, Q order."""
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q/k/v shapes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    parts = {"q": q, "k": k, "v": v}
    return np.concatenate([parts[n] for n in QKV_ORDER], axis=0)


def split_qkv(fused: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `fuse_qkv`: a K,V,Q-fused tensor -> (q, k, v)."""
    if fused.shape[0] % 3:
        raise ValueError(f"fused qkv dim 0 ({fused.shape[0]}) is not divisible by 3")
    k, v, q = np.split(fused, 3, axis=0)
    return q, k, v


# ---------------------------------------------------------------- model parallelism
def split_model_parallel(x: np.ndarray, parts: int, axis: int) -> list[np.ndarray]:
    """Megatron split of one tensor into `parts` equal slices along `axis`."""
    if x.shape[axis] % parts:
        raise ValueError(
            f"cannot split dim {axis} of shape {tuple(x.shape)} into {parts} equal parts"
        )
    return [np.ascontiguousarray(p) for p in np.split(x, parts, axis=axis)]


def merge_model_parallel(parts: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Inverse of `split_model_parallel`: concatenate the slices along `axis`."""
    shapes = {tuple(np.delete(np.array(p.shape), axis)) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"model-parallel parts disagree off axis {axis}: {[p.shape for p in parts]}")
    return np.concatenate(list(parts), axis=axis)


def split_qkv_model_parallel(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, parts: int
) -> list[np.ndarray]:
    """q/k/v -> one K,V,Q-fused tensor per model-parallel part (metaseq's on-disk layout).

    Each part holds its own slice of the heads, so the split happens before the fuse.
    """
    qs, ks, vs = (split_model_parallel(t, parts, 0) for t in (q, k, v))
    return [fuse_qkv(qp, kp, vp) for qp, kp, vp in zip(qs, ks, vs)]


def merge_qkv_model_parallel(
    fused_parts: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `split_qkv_model_parallel`: per-part fused K,V,Q tensors -> (q, k, v)."""
    split = [split_qkv(p) for p in fused_parts]
    q, k, v = (merge_model_parallel([s[i] for s in split], 0) for i in range(3))
    return q, k, v
