"""Shared fixtures: paths to ../shared data, tiny random checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPT_SHARED", ROOT.parent / "shared"))
TOKENIZER_DIR = SHARED / "data" / "opt-tokenizer"
CONFIGS_DIR = SHARED / "data" / "opt-configs"
CORPUS_DIR = SHARED / "data" / "corpus"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared data folder is missing: {SHARED} (set OPT_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir: Path) -> Path:
    return TOKENIZER_DIR
