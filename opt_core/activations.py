"""Activation functions OPT configs may name, as float64 NumPy references.

Names and formulas follow Hugging Face's `ACT2FN`, so a config that loads there loads here with the
same math. Each backend maps the same names to its own ops (and is tested against these).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Array = np.ndarray


def _erf(x: Array) -> Array:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def relu(x: Array) -> Array:
    return np.maximum(x, 0.0)


def gelu(x: Array) -> Array:
    """Exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x: Array) -> Array:
    """The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_fast(x: Array) -> Array:
    return 0.5 * x * (1.0 + np.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x: Array) -> Array:
    return x * sigmoid(1.702 * x)


def sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-x))


def silu(x: Array) -> Array:
    return x * sigmoid(x)


def relu6(x: Array) -> Array:
    return np.clip(x, 0.0, 6.0)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": relu,
    "relu6": relu6,
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "silu": silu,
    "swish": silu,
    "sigmoid": sigmoid,
    "tanh": np.tanh,
}
