"""The generation tests' view of a backend: how to load a causal LM and read `generate`'s result.

Until the shared backend-fixture harness lands (owner: `struct`), this small local table serves
tests/generation/; the `backend` fixture in tests/generation/conftest.py runs every contract and
golden test once per name in ENABLED. Turning on a backend = adding its name to ENABLED (genx
does "tf" and "flax" once their generate follows the contract).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opt_core import OPTConfig

ENABLED = ("torch", "tf", "flax")


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[..., Any]  # (folder, dtype=None) -> OPTForCausalLM
    build: Callable[[OPTConfig], Any]  # config -> randomly initialised OPTForCausalLM
    to_numpy: Callable[[Any], np.ndarray]  # generate's result -> NumPy, dtype unchanged
    is_int64: Callable[[Any], bool]  # the contract's result dtype


def _torch() -> Backend:
    import torch

    from opt_torch import OPTForCausalLM

    def load(folder: Path, dtype: str | None = None) -> Any:
        return OPTForCausalLM.from_pretrained(folder, dtype=dtype)

    def build(config: OPTConfig) -> Any:
        torch.manual_seed(0)
        return OPTForCausalLM(config).eval()

    return Backend("torch", load, build, lambda out: out.detach().cpu().numpy(),
                   lambda out: isinstance(out, torch.Tensor) and out.dtype == torch.int64)


def _tf() -> Backend:
    import tensorflow as tf

    from opt_tf import OPTForCausalLM

    def load(folder: Path, dtype: str | None = None) -> Any:
        return OPTForCausalLM.from_pretrained(folder, dtype=dtype)

    def build(config: OPTConfig) -> Any:
        tf.keras.utils.set_random_seed(0)
        return OPTForCausalLM(config)

    return Backend("tf", load, build, lambda out: out.numpy(),
                   lambda out: isinstance(out, tf.Tensor) and out.dtype == tf.int64)


def _flax() -> Backend:
    from flax import nnx

    from opt_flax import OPTForCausalLM

    def load(folder: Path, dtype: str | None = None) -> Any:
        return OPTForCausalLM.from_pretrained(folder, dtype=dtype)

    def build(config: OPTConfig) -> Any:
        return OPTForCausalLM(config, rngs=nnx.Rngs(0))

    # The contract's Flax result is a NumPy int64 array (JAX without x64 holds no int64).
    return Backend("flax", load, build, np.asarray,
                   lambda out: isinstance(out, np.ndarray) and out.dtype == np.int64)


FACTORIES = {"torch": _torch, "tf": _tf, "flax": _flax}


def get_backend(name: str) -> Backend:
    return FACTORIES[name]()
