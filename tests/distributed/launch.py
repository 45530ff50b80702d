"""Start N local processes for a check script (torchrun or plain `jax.distributed` workers) on
127.0.0.1 with a free port, and read the JSON line the first one writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    env.update(extra or {})
    return env


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: float = 240) -> tuple[dict, float]:
    """Run tests/distributed/`script` under torchrun with `nproc` processes; returns the JSON its
    rank 0 printed last and the wall time of the whole launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / script), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return _last_json(proc.stdout), wall


def python(script: str, args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run tests/distributed/`script` in one plain process (the one-process baseline)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          env=_env(env), timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return _last_json(proc.stdout), wall


def processes(script: str, args: list[str], n: int = 2, timeout: float = 240,
              env: dict[str, str] | None = None) -> tuple[list[dict], float]:
    """Run `n` copies of tests/distributed/`script` with PROCESS_ID / NUM_PROCESSES / COORDINATOR set
    (jax.distributed); returns each one's last JSON line and the wall time."""
    port = free_port()
    start = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT,
                         env=_env({**(env or {}), "PROCESS_ID": str(i), "NUM_PROCESSES": str(n),
                                   "COORDINATOR": f"127.0.0.1:{port}"}))
        for i in range(n)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-3000:] + err[-5000:]
            outs.append(_last_json(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs, time.perf_counter() - start


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in the output:\n{stdout[-3000:]}"
    return json.loads(lines[-1])
