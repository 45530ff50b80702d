"""Eager vs SDPA attention in opt_torch on the opt-350m shape: the seed document's two tables.

    python benchmarks/bench_attention.py                 # GPU present: fp16, full grid; else CPU fp32, reduced grid
    python benchmarks/bench_attention.py --quick         # one point per table, a smoke run
    python benchmarks/bench_attention.py --device cpu --batches 1,2,4,8 --seqs 128,256,512,1024   # the full grid on CPU

Training: time per batch (forward + backward of the causal-LM loss, dropout on, no optimizer step,
as in the seed document's table) and peak memory. Inference: per-token latency of greedy
`generate` (total time / new tokens, prefill included) and peak memory. Peak memory is
`torch.cuda.max_memory_allocated` on a GPU and the process's peak RSS on CPU (weights, activations
and the framework itself: compare eager with SDPA, not with the GPU numbers).

Every (mode, batch, seq, attention) point runs in its own subprocess so peak memory is its own.
Random weights (Hugging Face init); speed does not depend on their values.
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
FULL_BATCHES = (1, 2, 4, 8)
FULL_SEQS = (128, 256, 512, 1024)
# On CPU (2 cores here) one opt-350m training step on 8 x 1024 tokens takes minutes; the default CPU
# grid stops where a full run stays under ~15 minutes. Pass --batches/--seqs for the full grid.
CPU_TRAIN_BATCHES, CPU_TRAIN_SEQS = (1, 2), (128, 256)
CPU_INFER_BATCHES, CPU_INFER_SEQS = (1, 2, 4), (128, 256, 512)


# ---------------------------------------------------------------- one point (subprocess)
def run_point(p: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from opt_core import OPTConfig
    from opt_torch import OPTForCausalLM

    if p["threads"]:
        torch.set_num_threads(p["threads"])
    device = torch.device(p["device"])
    dtype = getattr(torch, p["dtype"])
    cfg = OPTConfig.from_preset(p["shape"], eos_token_id=None)  # no early stop: every token generated
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg, attn_implementation=p["attn"])
    if hasattr(model, "init_weights"):
        model.init_weights()
    model.to(device=device, dtype=dtype)
    if hasattr(model, "optimize_layout"):
        model.optimize_layout()  # the weight layout from_pretrained gives every loaded model
    b, s = p["batch"], p["seq"]
    ids = torch.randint(4, cfg.vocab_size, (b, s), device=device)
    mask = torch.ones_like(ids)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out: dict = {}
    try:
        if p["mode"] == "train":
            model.train()

            def step() -> None:
                logits = model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
                loss.backward()
                model.zero_grad(set_to_none=True)

            step()  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(p["steps"]):
                step()
            sync()
            out["seconds_per_batch"] = (time.perf_counter() - t0) / p["steps"]
        else:
            model.eval()
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # warm-up
                times = []
                for _ in range(3):  # median of 3: single timings here varied by up to 2x
                    sync()
                    t0 = time.perf_counter()
                    gen = model.generate(ids, attention_mask=mask, max_new_tokens=p["new_tokens"], do_sample=False)
                    sync()
                    times.append(time.perf_counter() - t0)
                dt = sorted(times)[1]
            new = int(gen.shape[1]) - s
            out["new_tokens"] = new
            out["ms_per_token"] = 1000 * dt / max(new, 1)
    except torch.OutOfMemoryError:
        out["oom"] = True
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import peak_rss_mb  # VmHWM: this process only, unlike ru_maxrss

        out["peak_mb"] = peak_rss_mb()
    return out


# ---------------------------------------------------------------- the grid (parent)
def measure(point: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--point", json.dumps(point)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(slow: float | None, fast: float | None) -> str:
    if not slow or not fast:
        return "-"
    return f"{100 * (slow / fast - 1):.3f}"


def _cell(r: dict, key: str, digits: int = 3) -> str:
    if r.get("oom"):
        return "OOM"
    if "error" in r:
        return "error"
    return _fmt(r.get(key), digits)


def tables(results: list[dict]) -> str:
    """The seed document's two Markdown tables, same columns."""
    by = {(r["mode"], r["batch"], r["seq"], r["attn"]): r for r in results}
    md = []
    train = sorted({(r["batch"], r["seq"]) for r in results if r["mode"] == "train"})
    if train:
        md += ["### Training", "",
               "| batch_size | seq_len | Time per batch (eager - s) | Time per batch (sdpa - s) | Speedup (%) "
               "| Eager peak mem (MB) | sdpa peak mem (MB) | Mem saving (%) |",
               "|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for b, s in train:
            e, d = by[("train", b, s, "eager")], by[("train", b, s, "sdpa")]
            md.append(f"| {b} | {s} | {_cell(e, 'seconds_per_batch')} | {_cell(d, 'seconds_per_batch')} | "
                      f"{_pct(e.get('seconds_per_batch'), d.get('seconds_per_batch'))} | {_cell(e, 'peak_mb')} | "
                      f"{_cell(d, 'peak_mb')} | {_pct(e.get('peak_mb'), d.get('peak_mb'))} |")
    infer = sorted({(r["batch"], r["seq"]) for r in results if r["mode"] == "infer"})
    if infer:
        md += ["", "### Inference", "",
               "| batch_size | seq_len | Per token latency eager (ms) | Per token latency SDPA (ms) | Speedup (%) "
               "| Mem eager (MB) | Mem SDPA (MB) | Mem saved (%) |",
               "|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for b, s in infer:
            e, d = by[("infer", b, s, "eager")], by[("infer", b, s, "sdpa")]
            md.append(f"| {b} | {s} | {_cell(e, 'ms_per_token')} | {_cell(d, 'ms_per_token')} | "
                      f"{_pct(e.get('ms_per_token'), d.get('ms_per_token'))} | {_cell(e, 'peak_mb')} | "
                      f"{_cell(d, 'peak_mb')} | {_pct(e.get('peak_mb'), d.get('peak_mb'))} |")
    return "\n".join(md)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="auto: float16 on a GPU, float32 on CPU")
    ap.add_argument("--shape", default="opt-350m")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--batches", type=_ints, help="training and inference batches (default: by device)")
    ap.add_argument("--seqs", type=_ints, help="sequence lengths (default: by device)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps after one warm-up")
    ap.add_argument("--new-tokens", type=int, default=None, help="inference: greedy tokens generated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    ap.add_argument("--quick", action="store_true", help="one point per table, few steps: a smoke run")
    ap.add_argument("--json", type=Path, metavar="OUT")
    ap.add_argument("--markdown", type=Path, metavar="OUT")
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))))
        return 0

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("float16" if device == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    gpu = device == "cuda"
    if args.quick:
        grids = {"train": ((1,), (128,)), "infer": ((1,), (128,))}
    elif args.batches or args.seqs or gpu:
        b = args.batches or FULL_BATCHES
        s = args.seqs or FULL_SEQS
        grids = {"train": (b, s), "infer": (b, s)}
    else:
        grids = {"train": (CPU_TRAIN_BATCHES, CPU_TRAIN_SEQS), "infer": (CPU_INFER_BATCHES, CPU_INFER_SEQS)}
    steps = args.steps or (1 if args.quick else (10 if gpu else 2))
    new_tokens = args.new_tokens or (8 if args.quick else (100 if gpu else 32))
    modes = [m for m in args.modes.split(",") if m]

    results = []
    started = time.time()
    for mode in modes:
        batches, seqs = grids[mode]
        for b in batches:
            for s in seqs:
                for attn in ("eager", "sdpa"):
                    point = dict(mode=mode, batch=b, seq=s, attn=attn, device=device, dtype=dtype,
                                 shape=args.shape, steps=steps, new_tokens=new_tokens, threads=args.threads)
                    r = {**point, **measure(point, args.timeout)}
                    results.append(r)
                    shown = r.get("seconds_per_batch", r.get("ms_per_token"))
                    print(f"{mode:5s} b={b} s={s:5d} {attn:5s}: {_fmt(shown)} "
                          f"{'s/batch' if mode == 'train' else 'ms/token'}, peak {_fmt(r.get('peak_mb'), 1)} MB"
                          f"{'  ' + r['error'] if 'error' in r else ''}{'  OOM' if r.get('oom') else ''}",
                          flush=True)
    gpu_name = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
    header = (f"{args.shape} shape, random weights, {device} ({gpu_name}), {dtype}, torch {torch.__version__}, "
              f"{torch.get_num_threads() if not args.threads else args.threads} threads, "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}; training: {steps} timed step(s) after one warm-up; "
              f"inference: {new_tokens} new tokens, median of 3 timed calls; memory: "
              f"{'torch.cuda.max_memory_allocated' if gpu else 'peak RSS of the process'}")
    text = header + "\n\n" + tables(results)
    print()
    print(text)
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n({time.time() - started:.0f}s; command: python benchmarks/bench_attention.py {shown})")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
