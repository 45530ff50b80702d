"""Fuzzing the readers: random mutations of real small files (config.json, a shard index, a
safetensors file, a pytorch_model.bin, a flax_model.msgpack) must each give a clear error naming
the file, or load; never a traceback of another kind, a hang, or unbounded memory. A few seconds
in the default suite, two minutes per seed under `slow`; seeded and reproducible (`fuzz.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.hostile.bounded import ROOT
from tests.hostile.fuzz import MAX_EXTRA_MB


def _fuzz(tmp_path, seed: int, seconds: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.hostile.fuzz", str(seed), str(seconds), str(tmp_path)],
                              capture_output=True, text=True, timeout=seconds + 120, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fuzz seed {seed} hung (no answer in {seconds + 120} s)") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FUZZ ")]
    assert lines, f"the fuzz worker crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("FUZZ "):])
    assert not report["failures"], json.dumps(report["failures"][:10], indent=1)
    assert report["extra_mb"] < MAX_EXTRA_MB, report
    return report


def test_fuzz_readers_briefly(tmp_path):
    report = _fuzz(tmp_path, seed=0, seconds=4)
    assert all(n > 0 for n in report["iterations"].values()), report["iterations"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_readers_long(tmp_path, seed):
    _fuzz(tmp_path, seed=seed, seconds=120)
