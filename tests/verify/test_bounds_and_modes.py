"""`opt verify` on inputs it must bound or modes some backends lack: `--quantize MODE` checks the backends
that offer MODE and says which it skipped; thousands of prompts are refused at once, naming the limit."""

from __future__ import annotations

import pytest

from opt_core import bundled
from opt_verify import format_table, verify
from tests.cli.entry import one_line_error, opt


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


def test_thousands_of_prompts_are_refused_at_once_naming_the_limit(tmp_path):
    import time

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(5000)))
    t0 = time.perf_counter()
    proc = opt("verify", "bundled", "--backends", "torch", "--prompts", prompts)
    assert time.perf_counter() - t0 < 60
    line = one_line_error(proc, 2, "verify")
    assert "5000 prompts" in line and "at most 64 prompts" in line and "split the prompts" in line
