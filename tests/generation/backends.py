"""The generation tests' view of a backend, built on the one backend table (`opt_cli.backends`):
how to load or build a causal LM, and how `generate`'s result reads. The `backend` fixture in
tests/generation/conftest.py runs every contract and golden test once per name in ENABLED."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opt_cli.backends import BACKENDS, adapter
from opt_core import OPTConfig
from opt_core.arrays import to_numpy

ENABLED = BACKENDS


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[..., Any]  # (folder, dtype=None) -> OPTForCausalLM
    build: Callable[[OPTConfig], Any]  # config -> randomly initialised OPTForCausalLM (seed 0)
    to_numpy: Callable[[Any], np.ndarray]  # generate's result -> NumPy, dtype unchanged
    is_int64: Callable[[Any], bool]  # the contract's result type: int64 in the framework's own array


def _is_int64(name: str) -> Callable[[Any], bool]:
    """torch and TF return their own int64 tensors; Flax a NumPy int64 array (JAX without x64 mode
    holds no int64)."""
    if name == "torch":
        import torch

        return lambda out: isinstance(out, torch.Tensor) and out.dtype == torch.int64
    if name == "tf":
        import tensorflow as tf

        return lambda out: isinstance(out, tf.Tensor) and out.dtype == tf.int64
    return lambda out: isinstance(out, np.ndarray) and out.dtype == np.int64


def get_backend(name: str) -> Backend:
    table = adapter(name)
    table.module()  # imports the framework (a clear error when it is missing)

    def load(folder: Path, dtype: str | None = None) -> Any:
        return table.load(Path(folder), dtype=dtype)

    return Backend(name, load, lambda config: table.new(config, seed=0), to_numpy, _is_int64(name))
