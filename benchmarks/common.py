"""Small helpers shared by the benchmark scripts: timing, peak RSS, subprocess workers, tables.

Standard library only, so every environment (.venv, .venv-bench, .venv-oracle) can import it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median / min wall seconds of `fn()` over `repeats` calls, after `warmup` unmeasured calls
    (the first one's time is kept as `first_s`)."""
    first = None
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t if first is None else first
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first or 0.0}


def run_worker(python: str | Path, script: str | Path, job: dict, timeout: int = 3600,
               env: dict[str, str] | None = None) -> dict:
    """Run `python script --worker JSON` in a fresh process; it prints one JSON line last.

    Returns the parsed dict, or {"error": ...} with the tail of stderr when the worker fails."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONHOME", "VIRTUAL_ENV"))}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    if not Path(python).exists():
        return {"error": f"interpreter {python} is missing"}
    try:
        proc = subprocess.run([str(python), str(script), "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"no result printed; stderr: {proc.stderr[-3000:]}"}
    return json.loads(lines[-1])


def worker_main(measure: Callable[[dict], dict]) -> None:
    """Entry point of a worker process: read the job from argv, print the result as JSON."""
    job = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    result = measure(job)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (numbers formatted with sensible precision)."""

    def cell(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"
        return "-" if x is None else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b in (None, 0):
        return None
    return a / b
