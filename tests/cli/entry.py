"""Running the real `opt` entry point in a subprocess, as a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What tests/conftest.py sets for the in-process suite; a user's shell has none of it.
TEST_ONLY_ENV = ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "GRPC_VERBOSITY", "GLOG_minloglevel")


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_ENV and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def opt_argv(*argv: object) -> list[str]:
    return [sys.executable, "-m", "opt_cli.main", *map(str, argv)]


def opt(*argv: object, timeout: float = 300, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`opt ARGV...` (python -m opt_cli.main), stdout and stderr captured as text."""
    return subprocess.run(opt_argv(*argv), cwd=cwd or ROOT, env=user_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_line_error(proc: subprocess.CompletedProcess, code: int, command: str) -> str:
    """Assert the run failed with `code` and exactly one stderr line `opt COMMAND: ...`; return it."""
    err = lines(proc.stderr)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(err) == 1, proc.stderr
    assert err[0].startswith(f"opt {command}: "), err
    return err[0]
