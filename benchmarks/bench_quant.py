"""Reduced precision against CTranslate2, measured so that machine load cannot pick the winner.

    .venv-bench/bin/python benchmarks/bench_quant.py                  # opt-125m shape, b1 and b8
    .venv-bench/bin/python benchmarks/bench_quant.py --rounds 3 --new-tokens 64 --markdown out.md

`make bench` (run_all.py) runs each implementation in its own subprocess, one after the other: on a
shared machine whose speed drifts by 2x over minutes, the ratio of two rows then measures the drift
as much as the code. Here every variant is loaded into ONE process (.venv-bench holds torch,
CTranslate2 and, with PYTHONPATH at the repository root, this project) and the timed `generate`
calls alternate variant by variant, round after round; each figure is the variant's best round,
and the spread over rounds is printed so the noise can be judged. Peak RSS cannot be separated
inside one process, so `--rss` measures it per variant in a subprocess of its own (load + one short
generate; VmHWM).

Variants: opt_torch fp32 / bf16 / int8 / int4 / w8a8 (from_pretrained(dtype=..., quantize=...)),
CTranslate2 fp32 / int8 (converted from the same random-weight folder, common.write_checkpoint) and
ONNX Runtime fp32 / int8 (opt_torch's model exported with its key/value cache, and that graph
through quantize_dynamic: benchmarks/ort_export.py; greedy loop in runners._ORT). Greedy, eos off,
prompt 32 tokens (common.prompt); tokens/s = batch x new tokens / wall time of the whole generate
(prefill included).

Before timing, the ONNX Runtime variants are checked (`check_onnx`): fp32 greedy tokens must equal
opt_torch fp32's on the batch-8 prompt and on a left-padded copy of it (else the run stops), and the
int8 graph's logits error against fp32 is reported. Without onnxruntime they are skipped, with the
reason printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {
    "opt_torch fp32": ("torch", {}),
    "opt_torch fp32 packed": ("torch", {"pack": True}),  # model.pack_weights(): on request only
    "opt_torch bf16": ("torch", {"dtype": "bfloat16"}),
    "opt_torch bf16 packed": ("torch", {"dtype": "bfloat16", "pack": True}),
    "opt_torch int8": ("torch", {"quantize": "int8"}),
    "opt_torch int4": ("torch", {"quantize": "int4"}),
    "opt_torch w8a8": ("torch", {"quantize": "w8a8"}),
    "CTranslate2 fp32": ("ct2", "float32"),
    "CTranslate2 int8": ("ct2", "int8"),
    "ONNX Runtime fp32": ("ort", "fp32"),
    "ONNX Runtime int8": ("ort", "int8"),
}
# (ours, peer) pairs whose ratio is reported, with the targets where it has one.
TARGETS = [
    ("opt_torch fp32", "CTranslate2 fp32", {1: 1.0, 8: 1.0}),
    ("opt_torch fp32 packed", "CTranslate2 fp32", {1: 1.0, 8: 1.0}),
    ("opt_torch bf16", "CTranslate2 int8", {}),
    ("opt_torch bf16 packed", "CTranslate2 int8", {}),
    ("opt_torch int8", "CTranslate2 int8", {1: 1.3}),
    ("opt_torch int4", "CTranslate2 int8", {}),
    ("opt_torch w8a8", "CTranslate2 int8", {1: 2.0, 8: 2.5}),
    ("opt_torch fp32", "ONNX Runtime fp32", {}),
    ("opt_torch int8", "ONNX Runtime int8", {}),
    ("opt_torch int4", "ONNX Runtime int8", {}),
    ("opt_torch w8a8", "ONNX Runtime int8", {}),
]
CHECK_TOKENS = 16  # greedy tokens compared by check_onnx


def load(name: str, folder: Path, threads: int):
    """A runner for `name`: an object with `generate(ids, mask, new_tokens)`."""
    sys.path.insert(0, str(common.ROOT))
    import runners

    kind, arg = VARIANTS[name]
    if kind == "torch":
        arg = dict(arg)
        pack = arg.pop("pack", False)
        runner = runners._load_opt_torch(str(folder), threads, **arg)
        if pack:
            runner.model.pack_weights()
        return runner
    if kind == "ort":
        return runners._ORT(str(folder), threads, arg)
    return runners._CT2(str(folder), threads, arg)


def available(names: list[str]) -> list[str]:
    """`names` less the ONNX Runtime variants when onnxruntime is not importable (printing why)."""
    if importlib.util.find_spec("onnxruntime") is not None:
        return names
    skipped = [n for n in names if VARIANTS[n][0] == "ort"]
    if skipped:
        print(f"skipped {', '.join(skipped)}: onnxruntime is not installed in this environment "
              "(make bench-env installs requirements/bench.txt)", flush=True)
    return [n for n in names if n not in skipped]


def left_padded(ids, mask):
    """The prompt with row r left-padded by 3 r tokens (pad id 1, then `</s>` starting the row)."""
    ids, mask = ids.copy(), mask.copy()
    for r in range(1, ids.shape[0]):
        k = min(3 * r, ids.shape[1] - 2)
        ids[r, :k], mask[r, :k], ids[r, k] = 1, 0, 2
    return ids, mask


def check_onnx(runners_: dict, folder: Path, threads: int, prompt_len: int) -> dict:
    """Check the ONNX Runtime variants in `runners_` (none: returns {}) on the batch-8 benchmark prompt
    and a left-padded copy: fp32 greedy tokens must equal opt_torch fp32's (RuntimeError if not); int8
    logits are compared with fp32's. Returns the figures for the report."""
    if not any(VARIANTS[n][0] == "ort" for n in runners_):
        return {}
    import numpy as np
    import torch

    fp32 = runners_.get("ONNX Runtime fp32") or load("ONNX Runtime fp32", folder, threads)
    ref = runners_.get("opt_torch fp32") or load("opt_torch fp32", folder, threads)
    out: dict = {"tokens": CHECK_TOKENS}
    prompts = {"benchmark prompt": common.prompt(8, prompt_len, seed=1)}
    prompts["left-padded"] = left_padded(*prompts["benchmark prompt"])
    for label, (ids, mask) in prompts.items():
        with torch.inference_mode():
            want = ref.model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                      max_new_tokens=CHECK_TOKENS, do_sample=False)[:, ids.shape[1]:].numpy()
        got = fp32.greedy(ids, mask, CHECK_TOKENS)
        if not np.array_equal(got, want):
            r, t = np.argwhere(got != want)[0]
            raise RuntimeError(f"ONNX Runtime fp32 greedy tokens differ from opt_torch fp32's on the {label} "
                               f"(row {r}, step {t}: {got[r, t]} vs {want[r, t]})")
    out["fp32_tokens_equal"] = True
    int8 = runners_.get("ONNX Runtime int8")
    if int8 is not None:
        ids, mask = prompts["left-padded"]
        l32, l8 = fp32.logits(ids, mask), int8.logits(ids, mask)  # [B, V]
        out["int8_logits_rel_error"] = float(np.linalg.norm(l8 - l32) / np.linalg.norm(l32))
        out["int8_logits_max_abs_error"] = float(np.abs(l8 - l32).max())
        out["int8_next_token_agreement"] = float((l8.argmax(-1) == l32.argmax(-1)).mean())
        same = (int8.greedy(ids, mask, CHECK_TOKENS) == fp32.greedy(ids, mask, CHECK_TOKENS)).all(-1)
        out["int8_rows_greedy_equal"] = f"{int(same.sum())}/{len(same)}"
    print(f"ONNX Runtime checks: {out}", flush=True)
    return out


def measure(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    folder = common.write_checkpoint(args.shape)
    names = available([n for n in VARIANTS if n in args.variants])
    runners_ = {}
    for n in names:
        t = time.perf_counter()
        runners_[n] = load(n, folder, args.threads)
        print(f"loaded {n} ({time.perf_counter() - t:.1f} s)", flush=True)
    checks = check_onnx(runners_, folder, args.threads, args.prompt_len)
    prompts = {b: common.prompt(b, args.prompt_len, seed=1) for b in args.batches}
    for n in names:  # warm-up at every measured shape (kernel choice, allocator, thread pools)
        for ids, mask in prompts.values():
            runners_[n].generate(ids, mask, 4)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batches} for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for b, (ids, mask) in prompts.items():
            for n in order:
                t = time.perf_counter()
                got = runners_[n].generate(ids, mask, args.new_tokens)
                dt = time.perf_counter() - t
                if got != args.new_tokens:
                    raise RuntimeError(f"{n} generated {got} tokens, asked for {args.new_tokens}")
                times[n][b].append(b * args.new_tokens / dt)
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"{n} " + "/".join(f"{times[n][b][-1]:.1f}" for b in args.batches) for n in names), flush=True)
    return {"tokens_per_s": times, "load_average": os.getloadavg(), "checks": checks}


def rss_worker(job: dict) -> dict:
    if VARIANTS[job["variant"]][0] == "torch":  # the peers run without torch (~220 MiB of RSS on import)
        import torch

        torch.set_num_threads(job["threads"])
    runner = load(job["variant"], Path(job["folder"]), job["threads"])
    ids, mask = common.prompt(8, 32, seed=1)
    runner.generate(ids, mask, 8)
    return {"variant": job["variant"], "peak_rss_mb": common.peak_rss_mb()}


def report(args: argparse.Namespace, res: dict, rss: dict) -> str:
    tps = res["tokens_per_s"]
    bs = args.batches
    head = ["variant"] + [f"b{b} tok/s best (all rounds)" for b in bs] + ["peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|--:" * (len(head) - 1) + "|"]
    for n in list(tps) or list(rss):  # --rss-only: no speed figures
        per_b = tps.get(n, {b: [] for b in bs})
        cells = [n] + [f"{max(v):.1f} ({', '.join(f'{x:.1f}' for x in v)})" if v else "-" for v in per_b.values()]
        cells.append(f"{rss[n]:.0f}" if n in rss else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ours vs peer | " + " | ".join(f"b{b} (target)" for b in bs) + " | peak RSS |",
              "|---" + "|--:" * (len(bs) + 1) + "|"]
    for ours, peer, target in TARGETS:
        if ours not in tps or peer not in tps:
            continue
        cells = [f"{ours} vs {peer}"]
        for b in bs:
            x = max(tps[ours][b]) / max(tps[peer][b])
            t = target.get(b)
            cells.append(f"{x:.2f}x" + (f" ({'met' if x >= t else 'missed'}: >= {t}x)" if t else ""))
        cells.append(f"{rss[ours] / rss[peer]:.2f}x" if ours in rss and peer in rss else "-")
        lines.append("| " + " | ".join(cells) + " |")
    checks = res.get("checks") or {}
    if checks:
        lines += ["", f"ONNX Runtime checks (batch 8, benchmark prompt and a left-padded copy, {checks['tokens']} "
                  "greedy tokens): fp32 tokens equal to opt_torch fp32's: "
                  + ("yes" if checks.get("fp32_tokens_equal") else "no")]
        if "int8_logits_rel_error" in checks:
            lines.append(f"ONNX Runtime int8 vs fp32 (left-padded prompt, last-position logits): relative L2 error "
                         f"{checks['int8_logits_rel_error']:.4f}, max abs {checks['int8_logits_max_abs_error']:.3f}, "
                         f"next token agrees in {checks['int8_next_token_agreement']:.0%} of rows, "
                         f"all {checks['tokens']} greedy tokens equal in {checks['int8_rows_greedy_equal']} rows")
    if "opt_torch w8a8" in rss and "opt_torch fp32" in rss:
        x = rss["opt_torch w8a8"] / rss["opt_torch fp32"]
        verdict = "met" if x <= 0.4 else "missed"
        lines += ["", f"opt_torch w8a8 peak RSS / fp32 peak RSS: {x:.2f}x (target <= 0.4x: {verdict})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="opt-125m")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="batch 1, 16 new tokens, 1 round: a smoke run")
    ap.add_argument("--rss-only", action="store_true", help="only the per-variant peak RSS (no speed rounds)")
    ap.add_argument("--rss", action="store_true", help="also measure each variant's peak RSS in its own process")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(rss_worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.batches, args.new_tokens, args.rounds = "1", 16, 1
    args.variants = [v.strip() for v in args.variants.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res = {"tokens_per_s": {}, "load_average": os.getloadavg()} if args.rss_only else measure(args)
    rss = {}
    if args.rss or args.rss_only:
        folder = str(common.write_checkpoint(args.shape))
        for n in available([n for n in args.variants if n in VARIANTS]):
            out = common.run_in_env(__file__, "bench", {"variant": n, "folder": folder, "threads": args.threads}, 1800)
            if "peak_rss_mb" in out:
                rss[n] = out["peak_rss_mb"]
            print(f"peak RSS {n}: {out}", flush=True)
    sys.path.insert(0, str(common.ROOT))
    from opt_core.platform import cpu_info

    cpu = cpu_info().model_name
    text = (f"{args.shape} shape, random weights, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
            f"{args.threads} threads, {args.rounds} interleaved rounds in one process; {cpu}; started {started}, "
            f"load average at the end {[round(x, 1) for x in res['load_average']]}\n\n" + report(args, res, rss))
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("markdown", "json")}
        args.json.write_text(json.dumps({"settings": settings, "results": res, "peak_rss_mb": rss}, indent=2,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
