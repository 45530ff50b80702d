"""Generation speed of opt_tf vs Hugging Face TFOPTForCausalLM (4.57.6, eager and XLA) and opt_torch.

Same random weights with the real opt-125m shape (seeded, eos disabled so every run makes all its
tokens), float32, 2 threads, prompt 32 tokens, 128 new tokens, batch 1 and 8. Each implementation
and batch runs in its own subprocess (Hugging Face in .venv-oracle, loading the same weights from a
tf_model.h5 written by opt_core.formats.tf_h5). Per run:

- first call: wall time of the first `generate` with these shapes (tracing + XLA compilation + run);
  `compile_s` = first call - steady call;
- steady: the best of `--repeats` further calls with the same shapes;
- decode tok/s = batch * (new - 2) / (steady(new) - steady(2)): the per-token rate with the prompt
  pass taken out (a 2-token generate is timed the same way; Hugging Face's XLA generate fails on
  max_new_tokens=1); e2e tok/s = batch * new / steady(new);
- cpu decode tok/s: the same with process CPU time (all threads) instead of wall time. On a shared,
  loaded machine wall times mostly measure the contention; CPU time measures the work.

    .venv/bin/python benchmarks/bench_tf.py [--batches 1 8] [--new-tokens 128] [--impls ...] [--json OUT]

Prints a table with ratios (vs Hugging Face TF's best mode and vs opt_torch) and writes the raw
numbers as JSON (default .cache/bench/bench_tf.json). Only the standard library is imported at module
level: the same file is the worker inside each environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 32
THREADS = 2
SHORT = 2  # new tokens of the run that measures the prompt pass


# ---------------------------------------------------------------- workers (one process each)
def _prompt(batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(4, 50000, (batch, PROMPT))
    ids[:, 0] = 2
    return ids.astype(np.int32), np.ones((batch, PROMPT), np.int32)


def _time_calls(call, repeats: int) -> dict:
    """First call (compile + run) and the best of `repeats` steady calls, for new=N and new=SHORT."""
    res = {}
    for key, n in (("new", None), ("short", SHORT)):
        t0 = time.perf_counter()
        call(n)
        first = time.perf_counter() - t0
        steady, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            call(n)
            steady.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res[f"first_{key}_s"] = first
        res[f"steady_{key}_s"] = min(steady)
        res[f"cpu_{key}_s"] = min(cpu)
    return res


def _tf_threads():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def worker_opt_tf(folder: str, batch: int, new_tokens: int, repeats: int) -> dict:
    tf = _tf_threads()
    from opt_tf import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder)
    ids, mask = _prompt(batch)
    shapes = []

    def call(n):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n or new_tokens)
        shapes.append(tuple(out.shape))

    res = _time_calls(call, repeats)
    assert shapes[0] == (batch, PROMPT + new_tokens), shapes[0]
    res["tf"] = tf.__version__
    return res


def _hf_tf_worker(folder: str, batch: int, new_tokens: int, repeats: int, xla: bool) -> dict:
    tf = _tf_threads()
    import transformers
    from transformers import TFOPTForCausalLM

    model = TFOPTForCausalLM.from_pretrained(folder, use_safetensors=False)
    ids, mask = _prompt(batch)
    ids_t, mask_t = tf.constant(ids), tf.constant(mask)
    gen = tf.function(model.generate, jit_compile=True) if xla else model.generate
    shapes = []

    def call(n):
        out = gen(ids_t, attention_mask=mask_t, max_new_tokens=n or new_tokens, do_sample=False)
        shapes.append(tuple(out.shape))

    res = _time_calls(call, repeats)
    assert shapes[0] == (batch, PROMPT + new_tokens), shapes[0]
    res["transformers"] = transformers.__version__
    return res


def worker_hf_tf_eager(folder: str, batch: int, new_tokens: int, repeats: int) -> dict:
    return _hf_tf_worker(folder, batch, new_tokens, repeats, xla=False)


def worker_hf_tf_xla(folder: str, batch: int, new_tokens: int, repeats: int) -> dict:
    return _hf_tf_worker(folder, batch, new_tokens, repeats, xla=True)


def worker_opt_torch(folder: str, batch: int, new_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from opt_torch import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder).eval()
    ids, mask = _prompt(batch)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    shapes = []

    def call(n):
        with torch.no_grad():
            out = model.generate(ids_t, attention_mask=mask_t, max_new_tokens=n or new_tokens)
        shapes.append(tuple(out.shape))

    res = _time_calls(call, repeats)
    assert shapes[0] == (batch, PROMPT + new_tokens), shapes[0]
    res["torch"] = torch.__version__
    return res


WORKERS = {
    "opt_tf": worker_opt_tf,
    "hf_tf_eager": worker_hf_tf_eager,
    "hf_tf_xla": worker_hf_tf_xla,
    "opt_torch": worker_opt_torch,
}
ORACLE_IMPLS = {"hf_tf_eager", "hf_tf_xla"}


# ---------------------------------------------------------------- orchestration
def make_checkpoint(folder: Path) -> None:
    """Random opt-125m-shaped weights (seeded), eos disabled, as safetensors + tf_model.h5."""
    if (folder / "tf_model.h5").is_file() and (folder / "model.safetensors").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from opt_core import OPTConfig
    from opt_core.checkpoint import save_numpy_safetensors
    from opt_core.formats.tf_h5 import write_tf_h5
    from opt_core.params import hf_name
    from opt_core.reference import random_parameters

    config = OPTConfig.from_preset("opt-125m", eos_token_id=None)
    params = random_parameters(config, "causal_lm", seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    stored = {k: v for k, v in params.items() if k != "lm_head.weight"}
    save_numpy_safetensors(folder, {hf_name(k, "causal_lm"): v for k, v in stored.items()})
    write_tf_h5(folder / "tf_model.h5", stored, config, "causal_lm")


def run_worker(name: str, folder: Path, batch: int, new_tokens: int, repeats: int) -> dict:
    python = ROOT / (".venv-oracle" if name in ORACLE_IMPLS else ".venv") / "bin" / "python"
    if not python.is_file():
        return {"error": f"{python} is missing (make {'oracle' if name in ORACLE_IMPLS else 'venv'})"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS), TF_NUM_INTRAOP_THREADS=str(THREADS), TF_NUM_INTEROP_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    if name in ORACLE_IMPLS:
        env["TF_USE_LEGACY_KERAS"] = "1"  # Hugging Face's TF classes need Keras 2
    cmd = [str(python), __file__, "--worker", name, "--folder", str(folder), "--batch", str(batch),
           "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    res["compile_s"] = res["first_new_s"] - res["steady_new_s"]
    res["e2e_tok_s"] = batch * new_tokens / res["steady_new_s"]
    decode_s = res["steady_new_s"] - res["steady_short_s"]
    res["decode_tok_s"] = batch * (new_tokens - SHORT) / decode_s if decode_s > 0 else None
    decode_cpu = res["cpu_new_s"] - res["cpu_short_s"]
    res["cpu_decode_tok_s"] = batch * (new_tokens - SHORT) / decode_cpu if decode_cpu > 0 else None
    return res


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--folder", default=str(ROOT / ".cache" / "bench" / "opt-125m-random-tf"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="steady calls per setting (the best is kept)")
    ap.add_argument("--impls", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    ap.add_argument("--json", default=str(ROOT / ".cache" / "bench" / "bench_tf.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.folder, args.batch, args.new_tokens, args.repeats)))
        return

    folder = Path(args.folder)
    make_checkpoint(folder)
    results: dict = {
        "config": {"model": "opt-125m shape, random weights", "dtype": "float32", "threads": THREADS,
                   "prompt": PROMPT, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_at_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runs": {},
    }
    for batch in args.batches:
        for impl in args.impls:
            res = run_worker(impl, folder, batch, args.new_tokens, args.repeats)
            results["runs"][f"{impl}/b{batch}"] = res
            print(f"  {impl} batch {batch}: {res}", file=sys.stderr, flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()

    print(f"\nopt-125m shape, fp32, {THREADS} threads, prompt {PROMPT}, {args.new_tokens} new tokens "
          f"(load average {results['machine']['load_avg_at_start'][0]:.1f} at start)")
    head = (f"{'impl':<12} {'batch':>5} {'compile s':>10} {'decode tok/s':>13} {'e2e tok/s':>10} "
            f"{'vs best HF TF':>14} {'vs opt_torch':>13} {'cpu tok/s':>10} {'cpu vs HF':>10} {'cpu vs torch':>12}")
    print(head)
    print("-" * len(head))
    for batch in args.batches:
        runs = {impl: results["runs"][f"{impl}/b{batch}"] for impl in args.impls}
        def best(key: str, runs=runs) -> float | None:
            return max((r.get(key) or 0 for i, r in runs.items() if i in ORACLE_IMPLS), default=0) or None

        hf_best, hf_cpu = best("decode_tok_s"), best("cpu_decode_tok_s")
        pt, pt_cpu = runs.get("opt_torch", {}).get("decode_tok_s"), runs.get("opt_torch", {}).get("cpu_decode_tok_s")
        for impl, r in runs.items():
            if "error" in r:
                print(f"{impl:<12} {batch:>5}   error: {r['error'][:90]}")
                continue
            dec, cpu = r["decode_tok_s"], r["cpu_decode_tok_s"]
            print(f"{impl:<12} {batch:>5} {r['compile_s']:>10.2f} {dec or 0:>13.1f} {r['e2e_tok_s']:>10.1f} "
                  f"{_fmt_ratio(dec, hf_best):>14} {_fmt_ratio(dec, pt):>13} {cpu or 0:>10.1f} "
                  f"{_fmt_ratio(cpu, hf_cpu):>10} {_fmt_ratio(cpu, pt_cpu):>12}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
