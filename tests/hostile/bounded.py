"""Run one load in a fresh interpreter and measure it: the error it raised (type, message), the
seconds it took and the peak memory it added over the interpreter's state after its imports.

A subprocess, not the test process: a hostile file that hangs the reader must not hang the suite
(the parent kills the child at `timeout`), and peak RSS (`ru_maxrss`) is a per-process high-water
mark that earlier tests would already have raised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_EXTRA_MB = 200  # the bound on a refused hostile file
MAX_SECONDS = 5.0

_TEMPLATE = """
import json, resource, sys, time
{setup}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = {{"error": None, "classes": [], "message": ""}}
try:
{action}
except BaseException as e:  # reported to the parent, which asserts on it
    result["error"] = type(e).__name__
    result["classes"] = [c.__name__ for c in type(e).__mro__]
    result["message"] = str(e)[:20000]
result["seconds"] = time.perf_counter() - start
result["extra_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print("RESULT " + json.dumps(result))
"""


@dataclass
class Outcome:
    error: str | None
    classes: list[str]  # the error type and its bases (not `mro`: a class attribute of every type)
    message: str
    seconds: float
    extra_mb: float


def run_bounded(action: str, setup: str = "", timeout: float = 120.0) -> Outcome:
    """Run `action` (Python statements) after `setup` (imports) in a child interpreter.

    Raises:
        AssertionError: the child did not finish within `timeout` seconds or printed no result.
    """
    script = _TEMPLATE.format(setup=textwrap.dedent(setup), action=textwrap.indent(textwrap.dedent(action), "    "))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the load did not finish in {timeout} s (it hangs):\n{action}") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the child printed no result (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return Outcome(**json.loads(lines[-1][len("RESULT "):]))


def assert_refused(outcome: Outcome, error: str, match: str, *, names: str | os.PathLike[str] | None = None,
                   max_mb: float = MAX_EXTRA_MB, max_seconds: float = MAX_SECONDS) -> None:
    """The child raised `error` (or a subclass) with a message matching `match` that names the
    file `names`, within the memory and time bounds."""
    assert outcome.error is not None, "the hostile file was accepted"
    assert error in outcome.classes, f"raised {outcome.error}, not {error}: {outcome.message}"
    assert re.search(match, outcome.message), f"message does not match {match!r}: {outcome.message}"
    if names is not None:
        assert str(names) in outcome.message, f"message does not name {names}: {outcome.message}"
    assert outcome.seconds < max_seconds, f"took {outcome.seconds:.1f} s (limit {max_seconds})"
    assert outcome.extra_mb < max_mb, f"peak memory grew by {outcome.extra_mb:.0f} MB (limit {max_mb})"
