"""The decode floor: how fast can batch-1 (and batch-8) decode be here, whatever the implementation?

    .venv/bin/python benchmarks/bench_floor.py                    # opt-125m shape, 2 threads
    .venv/bin/python benchmarks/bench_floor.py --shape opt-350m --frameworks torch

One decode step must multiply the new token(s) by every weight matrix of the model once. This times
exactly that and nothing else: the matrices of the real config shape (random fp32 values), applied
one after another to a [batch, in] activation, as a chain (each product feeds the next, as in a
decoder, so the products cannot overlap). The result is an upper bound on tokens/s for any fp32
implementation on this machine and framework: no attention, norms, cache or sampling included.

Per framework (each in its own subprocess):
- torch: nn.Linear's [out, in] layout and the input-major layout opt_torch uses (MKL);
- jax: x @ kernel with Flax's [in, out] kernels, under jax.jit (XLA CPU);
- tf: tf.matmul with Keras' [in, out] kernels, under tf.function(jit_compile=True) (XLA CPU).
Also reported: the bytes of weights streamed per step and the bandwidth that implies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def matrices(shape: str) -> list[tuple[int, int]]:
    """(in, out) of every matmul of one decode step, in order, lm_head last."""
    sys.path.insert(0, str(ROOT))
    from opt_core import OPTConfig

    c = OPTConfig.from_preset(shape)
    h, f, e = c.hidden_size, c.ffn_dim, c.embed_dim
    per_layer = [(h, h)] * 4 + [(h, f), (f, h)]  # q, k, v, out_proj, fc1, fc2
    outer_in = [(e, h)] if e != h else []
    outer_out = [(h, e)] if e != h else []
    return outer_in + per_layer * c.num_hidden_layers + outer_out + [(e, c.vocab_size)]


def _chain_inputs(mats: list[tuple[int, int]], batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((i, o), dtype=np.float32) * 0.02) for i, o in mats]  # [in, out]
    xs = {i: rng.standard_normal((batch, i), dtype=np.float32) for i, _ in mats}
    return ws, xs


def run_torch(mats, batch, threads, repeats):
    import torch

    torch.set_num_threads(threads)
    ws, xs = _chain_inputs(mats, batch)
    out = {}
    for layout in ("nn.Linear [out, in]", "input-major (opt_torch)"):
        if layout.startswith("nn.Linear"):
            weights = [torch.from_numpy(w.T.copy()) for w in ws]  # [out, in] contiguous
        else:
            weights = [torch.from_numpy(w.T.copy()).t().contiguous().t() for w in ws]  # [out, in] view of [in, out]
        x = {i: torch.from_numpy(v) for i, v in xs.items()}

        def step(weights=weights, x=x):
            for w in weights:
                torch.nn.functional.linear(x[w.shape[1]], w)

        out[layout] = _time(step, repeats)
    return out


def run_jax(mats, batch, threads, repeats):
    import jax
    import jax.numpy as jnp

    ws, xs = _chain_inputs(mats, batch)
    weights = [jnp.asarray(w) for w in ws]
    x = {i: jnp.asarray(v) for i, v in xs.items()}

    @jax.jit
    def chain(weights, x):
        y = None
        for w in weights:
            inp = x[w.shape[0]] if y is None or y.shape[-1] != w.shape[0] else y
            y = inp @ w
        return y

    jax.block_until_ready(chain(weights, x))
    return {"jit, [in, out] kernels": _time(lambda: jax.block_until_ready(chain(weights, x)), repeats)}


def run_tf(mats, batch, threads, repeats):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    ws, xs = _chain_inputs(mats, batch)
    weights = [tf.Variable(w) for w in ws]
    x = {i: tf.constant(v) for i, v in xs.items()}

    @tf.function(jit_compile=True)
    def chain():
        y = None
        for w in weights:
            inp = x[w.shape[0]] if y is None or y.shape[-1] != w.shape[0] else y
            y = tf.matmul(inp, w)
        return y

    chain()
    return {"XLA, [in, out] kernels": _time(lambda: chain().numpy(), repeats)}


def _time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


RUNNERS = {"torch": run_torch, "jax": run_jax, "tf": run_tf}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="opt-125m")
    ap.add_argument("--frameworks", default="torch,jax,tf")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        res = RUNNERS[job["fw"]](matrices(job["shape"]), job["batch"], job["threads"], job["repeats"])
        print(json.dumps(res))
        return 0

    mats = matrices(args.shape)
    nbytes = 4 * sum(i * o for i, o in mats)
    print(f"{args.shape}: {len(mats)} matrices, {nbytes / 1e6:.0f} MB of fp32 weights per decode step, "
          f"{args.threads} threads\n")
    print("| framework | weight layout | batch | ms per step | tokens/s bound | implied GB/s |")
    print("|---|---|--:|--:|--:|--:|", flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    jobs = [(fw, int(b)) for fw in args.frameworks.split(",") for b in args.batches.split(",")]
    # Each worker takes tens of seconds (a fresh framework import, warm-up, repeats): the bar on stderr
    # shows which one runs, the table rows on stdout appear as each finishes.
    progress = tqdm(jobs, desc="bench_floor", unit="run", file=sys.stderr)
    for fw, batch in progress:
        progress.set_postfix_str(f"{fw} batch {batch}")
        job = dict(fw=fw, shape=args.shape, batch=batch, threads=args.threads, repeats=args.repeats)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            row = f"| {fw} | error: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]} | {batch} | | | |"
            tqdm.write(row, file=sys.stdout)
            continue
        for layout, s in json.loads(lines[-1]).items():
            tqdm.write(f"| {fw} | {layout} | {batch} | {1e3 * s:.1f} | {batch / s:.1f} | {nbytes / s / 1e9:.1f} |",
                       file=sys.stdout)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
