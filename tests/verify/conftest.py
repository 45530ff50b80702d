"""Checkpoints and a stand-in backend for testing the `opt verify` engine without any backend.

The stand-in ("fake") backend is the float64 reference whose outputs are rounded to float32, loaded
from a folder chosen per backend name: pointing one backend at a corrupted copy is exactly what a
loader bug looks like from the outside.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from opt_core import OPTConfig
from opt_core.checkpoint import save_numpy_safetensors
from opt_core.params import Head, hf_name, parameter_table
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from tests.variants import VARIANTS

# the module itself: the package exports a function of the same name
engine = importlib.import_module("opt_verify.verify")


def write_checkpoint(folder: Path, config: OPTConfig, seed: int = 0) -> Path:
    """A safetensors checkpoint with random weights (std 1.0 so greedy text is varied)."""
    params = random_parameters(config, seed=seed, std=1.0)
    tensors = {
        hf_name(s.name, Head.CAUSAL_LM): params[s.name] for s in parameter_table(config) if s.tied_to is None
    }
    save_numpy_safetensors(folder, tensors)
    config.save_pretrained(folder)
    return folder


def corrupt_copy(src: Path, dst: Path, key: str, scale: float = 0.05, seed: int = 1) -> Path:
    """Copy a checkpoint folder, adding noise (`scale` x the tensor's std) to one tensor of its
    model.safetensors; every other file is copied byte for byte."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(str(path))
    if key not in tensors:
        raise KeyError(f"{key} not in {path}: {sorted(tensors)[:5]}...")
    w = tensors[key]
    noise = np.random.default_rng(seed).standard_normal(w.shape) * scale * float(w.std())
    tensors[key] = (w + noise).astype(w.dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


class FakeBackend:
    """Stands in for `opt_<name>.OPTForCausalLM` (see the module docstring)."""

    folders: dict[str, Path] = {}

    def __init__(self, name: str, model_dir: Path, dtype: str, quantize: str | None = None):
        self.ref = engine._ReferenceAdapter(self.folders.get(name, model_dir))

    def forward(self, ids, mask):
        logits, hidden = self.ref.forward(ids, mask)
        as32 = lambda x: x.astype(np.float32).astype(np.float64)
        return as32(logits), [as32(h) for h in hidden]

    def generate(self, ids, mask, new_tokens):
        return self.ref.generate(ids, mask, new_tokens)


@pytest.fixture
def fake_backends(monkeypatch):
    """Every backend 'installed' and served by `FakeBackend`; returns the name -> folder overrides."""
    folders: dict[str, Path] = {}
    monkeypatch.setattr(FakeBackend, "folders", folders)
    monkeypatch.setattr(engine, "_BackendAdapter", FakeBackend)
    monkeypatch.setattr(engine, "backend_available", lambda name: None)
    return folders


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "pre_ln", VARIANTS["pre_ln"])


@pytest.fixture(scope="session")
def tiny_proj_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "post_ln_proj", VARIANTS["post_ln_proj"])


def reference_logits(folder: Path, ids, mask):
    return ReferenceOPTForCausalLM.from_pretrained(folder)(ids, mask).logits
