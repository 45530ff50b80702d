"""Shared fixtures: paths to the data carried in the repository (data/), tiny random checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Calibration results go to the user's cache folder (opt_core.user_cache): the suite's to a temporary one.
os.environ.setdefault("OPT_CACHE", tempfile.mkdtemp(prefix="opt-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TOKENIZER_DIR = DATA / "opt-tokenizer"
CONFIGS_DIR = DATA / "opt-configs"
CORPUS_DIR = DATA / "corpus"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return TOKENIZER_DIR


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in ("torch", "tf", "flax")])
def backend(request):
    """The adapter of one backend (tests/backends.py); a test taking it runs once per backend and
    carries that backend's marker (`-m torch` selects the torch runs)."""
    from tests.backends import get_backend

    return get_backend(request.param)
