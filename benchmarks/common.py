"""What the benchmark scripts share: peak RSS (VmHWM), the prompts, the random-weight checkpoint
writer, the environments and the job runner (one subprocess per measurement), timing and tables.

Standard library only, so every environment (.venv, .venv-bench, .venv-oracle) can import it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


CACHE = ROOT / ".cache" / "bench"
TOKENIZER_DIR = ROOT / "data" / "opt-tokenizer"
TOKENIZER_VOCAB = 50265  # ids the real tokenizer knows (CTranslate2 works on its token strings)
VENVS = {"main": ROOT / ".venv", "bench": ROOT / ".venv-bench", "oracle": ROOT / ".venv-oracle"}
VENV_HINT = {
    "main": "make venv",
    "bench": "make bench-env",
    "oracle": "make oracle",
}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM, which starts afresh at exec (unlike
    getrusage's ru_maxrss, which a child inherits from its parent across exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt(batch: int, length: int, seed: int = 0):
    """Random token ids [batch, length] (`</s>` first, as every OPT prompt) and an all-ones mask."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(4, TOKENIZER_VOCAB, (batch, length)).astype(np.int64)
    ids[:, 0] = 2  # </s> starts every OPT prompt
    return ids, np.ones_like(ids)


def write_checkpoint(shape: str, seed: int = 0) -> Path:
    """The random-weight Hugging Face folder for `shape` (written once, cached under .cache/bench)."""
    folder = CACHE / f"{shape}-seed{seed}-noeos"
    if (folder / "model.safetensors").is_file():
        return folder
    sys.path.insert(0, str(ROOT))
    from opt_core import OPTConfig
    from opt_core.checkpoint import save_numpy_safetensors
    from opt_core.params import Head, hf_name, parameter_table
    from opt_core.reference import random_parameters

    # eos off (no token ends a row), so every implementation generates every requested token
    cfg = OPTConfig.from_preset(shape, eos_token_id=None)
    params = random_parameters(cfg, seed=seed)
    tensors = {hf_name(s.name, Head.CAUSAL_LM): params[s.name] for s in parameter_table(cfg) if s.tied_to is None}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_numpy_safetensors(tmp, tensors, max_shard_bytes="100GB")
    cfg.save_pretrained(tmp)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (TOKENIZER_DIR / name).is_file():  # CTranslate2's converter reads the vocabulary
            shutil.copy(TOKENIZER_DIR / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def worker_env(env_name: str, threads: int) -> dict:
    """Environment variables for a worker subprocess in `env_name` with `threads` threads (0: default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    if env_name == "main":
        env["PYTHONPATH"] = str(ROOT)
    if env_name == "oracle":
        env["TF_USE_LEGACY_KERAS"] = "1"
    if threads:
        n = str(threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
                   XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}")
    return env


def run_in_env(script: str | Path, env_name: str, job: dict, timeout: int, base: dict | None = None) -> dict:
    """Run `script --worker JSON` with the Python of environment `env_name` (see `worker_env`); the
    last JSON line it prints, or `base` plus an "error" when it is missing, fails or times out."""
    base = dict(base or {})
    python = VENVS[env_name] / "bin" / "python"
    if not python.is_file():
        return {**base, "error": f"environment {VENVS[env_name].name} is missing ({VENV_HINT[env_name]})"}
    env = worker_env(env_name, job.get("threads", 0))
    try:
        proc = subprocess.run([str(python), str(script), "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {**base, "error": f"exit {proc.returncode}: {err[-1][:300] if err else 'no output'}"}
    return json.loads(lines[-1])


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
