"""Generation speed of opt_flax vs Hugging Face FlaxOPTForCausalLM (4.57.6) and opt_torch.

Same random weights with the real opt-125m shape, float32, 2 threads, prompt 32 tokens, 128 new
tokens (eos disabled so every run generates all of them), batch 1 and 8. Each implementation runs in
its own subprocess (Hugging Face in .venv-oracle). Reported per run:

- first call: wall time of the first `generate` (includes tracing/compilation);
- steady: tokens/s of a second `generate` with the same shapes (batch * 128 / wall time, prefill
  included; the prompt is short, so this is the decode rate to within a few percent).

    .venv/bin/python benchmarks/bench_flax.py [--batches 1 8] [--new-tokens 128] [--json bench-out/flax.json]

Writes a table to stdout and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 32
THREADS = int(os.environ.get("OPT_BENCH_THREADS", "2"))  # workers inherit --threads through this


# ---------------------------------------------------------------- workers (one process each)
def _prompt(batch: int, vocab: int = 50272):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(4, 50000, (batch, PROMPT))
    ids[:, 0] = 2
    return ids.astype(np.int32), np.ones((batch, PROMPT), np.int32)


def worker_ours(folder: str, batch: int, new_tokens: int) -> dict:
    import jax

    from opt_flax import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder)
    ids, mask = _prompt(batch)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    assert out.shape == (batch, PROMPT + new_tokens), out.shape
    return {"first_call_s": times[0], "steady_s": times[1]}


def worker_torch(folder: str, batch: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from opt_torch import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder).eval()
    ids, mask = _prompt(batch)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            out = model.generate(ids_t, attention_mask=mask_t, max_new_tokens=new_tokens)
            times.append(time.perf_counter() - t0)
    assert tuple(out.shape) == (batch, PROMPT + new_tokens), out.shape
    return {"first_call_s": times[0], "steady_s": times[1]}


def worker_hf(folder: str, batch: int, new_tokens: int) -> dict:
    import jax
    import jax.numpy as jnp
    from transformers import FlaxOPTForCausalLM

    model = FlaxOPTForCausalLM.from_pretrained(folder)
    ids, mask = _prompt(batch)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        # eos off: HF Flax needs an eos id; min_length masks it until the last token.
        out = model.generate(jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=2, pad_token_id=1, min_length=PROMPT + new_tokens)
        jax.block_until_ready(out.sequences)
        times.append(time.perf_counter() - t0)
    assert out.sequences.shape == (batch, PROMPT + new_tokens), out.sequences.shape
    return {"first_call_s": times[0], "steady_s": times[1]}


WORKERS = {"opt_flax": worker_ours, "hf_flax": worker_hf, "opt_torch": worker_torch}


# ---------------------------------------------------------------- orchestration
def make_checkpoint(folder: Path) -> None:
    """Random opt-125m-shaped weights (seeded), eos disabled, as safetensors + flax_model.msgpack."""
    if (folder / "flax_model.msgpack").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from opt_core import OPTConfig
    from opt_core.checkpoint import save_numpy_safetensors
    from opt_core.formats.flax_msgpack import write_flax_msgpack
    from opt_core.params import hf_name
    from opt_core.reference import random_parameters

    config = OPTConfig.from_preset("opt-125m", eos_token_id=None)
    params = random_parameters(config, "causal_lm", seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    stored = {k: v for k, v in params.items() if k != "lm_head.weight"}
    save_numpy_safetensors(folder, {hf_name(k, "causal_lm"): v for k, v in stored.items()})
    write_flax_msgpack(folder / "flax_model.msgpack", stored, config, "causal_lm")


def run_worker(name: str, folder: Path, batch: int, new_tokens: int) -> dict:
    python = ROOT / (".venv-oracle" if name == "hf_flax" else ".venv") / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}",
        OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT),
        OPT_BENCH_THREADS=str(THREADS),
    )
    cmd = [str(python), __file__, "--worker", name, "--folder", str(folder), "--batch", str(batch),
           "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["steady_tok_s"] = batch * new_tokens / res["steady_s"]
    return res


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--folder", default=str(ROOT / "bench-out" / "opt-125m-random"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--impls", nargs="+", default=list(WORKERS))
    ap.add_argument("--json", default=str(ROOT / "bench-out" / "bench_flax.json"))
    ap.add_argument("--threads", type=int, default=THREADS, help="CPU threads per implementation (default 2)")
    args = ap.parse_args()
    THREADS = args.threads
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.folder, args.batch, args.new_tokens)))
        return

    folder = Path(args.folder)
    make_checkpoint(folder)
    results: dict = {"config": {"model": "opt-125m shape, random weights", "dtype": "float32", "threads": THREADS,
                                "prompt": PROMPT, "new_tokens": args.new_tokens}, "runs": {}}
    for batch in args.batches:
        for impl in args.impls:
            res = run_worker(impl, folder, batch, args.new_tokens)
            results["runs"][f"{impl}/b{batch}"] = res
            print(f"  {impl} batch {batch}: {res}", file=sys.stderr, flush=True)

    print(f"\nopt-125m shape, fp32, {THREADS} threads, prompt {PROMPT}, {args.new_tokens} new tokens")
    header = f"{'impl':<10} {'batch':>5} {'first call s':>13} {'steady tok/s':>13}"
    print(f"{header} {'vs hf_flax':>10} {'vs opt_torch':>12}")
    for batch in args.batches:
        hf = results["runs"].get(f"hf_flax/b{batch}", {}).get("steady_tok_s")
        pt = results["runs"].get(f"opt_torch/b{batch}", {}).get("steady_tok_s")
        for impl in args.impls:
            r = results["runs"][f"{impl}/b{batch}"]
            if "error" in r:
                print(f"{impl:<10} {batch:>5}   error: {r['error'][:80]}")
                continue
            tps = r["steady_tok_s"]
            vs_hf = f"{tps / hf:.2f}x" if hf else "-"
            vs_pt = f"{tps / pt:.2f}x" if pt else "-"
            print(f"{impl:<10} {batch:>5} {r['first_call_s']:>13.2f} {tps:>13.1f} {vs_hf:>10} {vs_pt:>12}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
