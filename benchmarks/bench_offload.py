"""Models larger than memory (opt_torch): tokens/s and peak RSS of one model per placement, fully in
memory and with `device_map="auto", max_memory={"cpu": SIZE}` sending the layers that do not fit to
disk (streamed from the safetensors file in place on every forward).

The checkpoint is random weights of a preset's shape (default opt-1.3b), written one tensor at a
time as safetensors to a temporary folder (or `--folder`, kept), after checking the free disk
space. Each placement runs in a fresh process: load, then greedy `generate` of `--new-tokens`
tokens after a `--prompt`-token prompt. Reported per placement: layers on disk, load seconds, time
to the first token (prefill, streaming every disk layer once), decode tokens/s (the tokens after
the first), peak RSS above the process's RSS before loading (torch imported, kernel choice made),
and whether the tokens equal the in-memory run's.

    .venv/bin/python benchmarks/bench_offload.py --max-memory 1GB 2.5GB --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import format_table, run_worker  # noqa: E402


def _status(key: str) -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key))


def write_random_checkpoint(folder: Path, shape: str, dtype: str) -> int:
    """Random weights of preset `shape` in `dtype` as model.safetensors, one tensor in memory at a
    time (LayerNorms 1/0, biases 0, the rest N(0, 0.02)); eos off so every token is generated.
    Returns the bytes written."""
    import numpy as np

    from opt_core import Head, OPTConfig, parameter_table
    from opt_core.formats.base import TensorPlan
    from opt_core.formats.safetensors import SafetensorsWriter
    from opt_core.params import Role, hf_name

    np_dtype = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}.get(dtype)
    if np_dtype is None:
        import ml_dtypes

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    config = OPTConfig.from_preset(shape, eos_token_id=None, torch_dtype=dtype)
    head = Head.CAUSAL_LM
    specs = [s for s in parameter_table(config, head) if s.tied_to is None]
    folder.mkdir(parents=True, exist_ok=True)
    plan = [TensorPlan(s, hf_name(s.name, head), np_dtype) for s in specs]
    writer = SafetensorsWriter(folder, plan, config, head, None)
    rng = np.random.default_rng(0)
    try:
        for s in specs:
            if s.role is Role.NORM_WEIGHT:
                arr = np.ones(s.shape, np.float32)
            elif s.role in (Role.NORM_BIAS, Role.LINEAR_BIAS):
                arr = np.zeros(s.shape, np.float32)
            else:
                arr = rng.standard_normal(s.shape, dtype=np.float32)
                arr *= 0.02
            writer.write(s.name, arr.astype(np_dtype, copy=False))
        paths = writer.commit()
    except BaseException:
        writer.abort()
        raise
    config.save_pretrained(folder)
    return sum(p.stat().st_size for p in paths)


def measure(job: dict) -> dict:
    """One placement in this (fresh) process."""
    import torch

    torch.set_num_threads(job["threads"])
    from opt_core import OPTConfig
    from opt_torch import OPTForCausalLM
    from opt_torch.kernels import choose_linear

    config = OPTConfig.from_pretrained(job["folder"])
    dtype = getattr(torch, job["dtype"])
    choose_linear(config.hidden_size, config.ffn_dim, dtype)  # the per-process kernel choice, not measured
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from the current RSS
    before = _status("VmRSS:")
    kwargs = {} if job["max_memory"] is None else {"device_map": "auto", "max_memory": {"cpu": job["max_memory"]}}
    t = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(job["folder"], dtype=job["dtype"], **kwargs)
    load_s = time.perf_counter() - t
    after_load = _status("VmRSS:")

    stamps: list[float] = []

    class Clock:  # Hugging Face's streamer interface: put(prompt), put(token)..., end()
        def put(self, _ids: object) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    rng = __import__("numpy").random.default_rng(0)
    ids = rng.integers(4, 50265, (1, job["prompt"])).astype("int64")
    ids[0, 0] = 2
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=job["new_tokens"], do_sample=False, streamer=Clock())
    n = len(stamps) - 2  # stamps[0]: the prompt, stamps[1]: the first new token
    device_map = getattr(model, "hf_device_map", {})
    return {
        "disk_layers": sum(v == "disk" for v in device_map.values()),
        "load_s": load_s,
        "first_token_s": stamps[1] - t,
        "decode_tok_s": n / (stamps[-1] - stamps[1]) if n > 0 else None,
        "rss_before_mb": before / 1e6,
        "after_load_mb": (after_load - before) / 1e6,
        "peak_added_mb": (_status("VmHWM:") - before) / 1e6,
        "tokens": out[0, job["prompt"]:].tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="opt-1.3b", help="preset whose shape the random model has")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-memory", nargs="+", default=["1GB"], help="CPU budgets to run with disk offload")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machines: 1)")
    p.add_argument("--folder", type=Path, help="write (or reuse) the checkpoint here and keep it")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    from opt_core import OPTConfig, parameter_count

    nbytes = parameter_count(OPTConfig.from_preset(args.shape)) * (4 if args.dtype == "float32" else 2)
    tmp = None
    folder = args.folder
    if folder is None:
        tmp = folder = Path(tempfile.mkdtemp(prefix="bench_offload-"))
    try:
        if not (folder / "model.safetensors").is_file():
            free = shutil.disk_usage(folder.parent if not folder.exists() else folder).free
            if free < 1.2 * nbytes:
                sys.exit(f"{folder}: {free / 1e9:.1f} GB free, the {args.shape} checkpoint needs {nbytes / 1e9:.1f} GB")
            t = time.perf_counter()
            written = write_random_checkpoint(folder, args.shape, args.dtype)
            print(f"wrote {written / 1e9:.2f} GB to {folder} in {time.perf_counter() - t:.0f} s", flush=True)
        rows, results, reference = [], [], None
        for budget in [None, *args.max_memory]:
            job = {"folder": str(folder), "dtype": args.dtype, "max_memory": budget, "threads": args.threads,
                   "new_tokens": args.new_tokens, "prompt": args.prompt}
            r = run_worker(sys.executable, __file__, job, timeout=3600)
            r["placement"] = "all in memory" if budget is None else f'max_memory={{"cpu": "{budget}"}}'
            results.append(r)
            if "error" in r:
                print(f"{r['placement']}: {r['error']}", flush=True)
                continue
            reference = r["tokens"] if reference is None else reference
            rows.append([r["placement"], r["disk_layers"], r["load_s"], r["first_token_s"], r["decode_tok_s"],
                         r["after_load_mb"], r["peak_added_mb"], "yes" if r["tokens"] == reference else "NO"])
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"\n{args.shape}-shaped random weights, {args.dtype}, {nbytes / 1e9:.2f} GB; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy, {args.threads} thread(s); {model_name}, {platform.python_version()}")
    print(format_table(["placement", "disk layers", "load s", "first token s", "decode tok/s",
                        "RSS after load MB", "peak RSS added MB", "same tokens"], rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from benchmarks.common import worker_main

        worker_main(measure)
    else:
        main()
