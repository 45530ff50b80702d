"""Tensor + data parallelism on 8 virtual CPU devices, in a separate process (the device count is
fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.flax
ROOT = Path(__file__).resolve().parents[2]


def test_meshes_match_one_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sharding_check.py"))],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"1x8", "2x4", "8x1"}
    for shape, r in results.items():
        assert r["logits_rel_err"] < 1e-5, (shape, r)
        assert r["tokens_equal"], (shape, r)
        for ours, ref in zip(r["losses"], r["reference_losses"]):
            assert abs(ours - ref) <= 1e-5 * abs(ref), (shape, r)
        assert r["fc1_column_parallel"], (shape, r)
