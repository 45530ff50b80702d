"""`opt verify --quantize MODE` checks the backends that offer MODE and says which it skipped."""

from __future__ import annotations

import pytest

from opt_core import bundled
from opt_verify import format_table, verify
from tests.cli.entry import opt


@pytest.mark.torch
def test_int4_checks_torch_and_names_the_backends_without_it():
    proc = opt("verify", "bundled", "--quantize", "int4", "--new-tokens", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    for name in ("tf", "flax"):
        assert f"{name}: SKIPPED - quantize='int4' is not offered by opt_{name} (it offers int8, w8a8)" in out
    assert "torch: ok" in out


def test_a_mode_no_requested_backend_offers_fails_with_one_line():
    report = verify(bundled.path(), backends=("tf", "flax"), quantize="int4", reference=False)
    assert not report.passed
    assert "none of the backends tf, flax offers quantize='int4'" in format_table(report)
    proc = opt("verify", "bundled", "--backends", "tf,flax", "--quantize", "int4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
