"""`make bench`: one harness, one run, the same random weights, every implementation.

    python benchmarks/run_all.py              # opt-125m and opt-350m shapes, all implementations
    python benchmarks/run_all.py --quick      # opt-125m, batch 1, fewer tokens: a smoke run
    python benchmarks/run_all.py --impls opt_torch,hf_torch,ct2_int8 --shapes opt-125m

Measures, per implementation and model shape (real opt-125m / opt-350m configs, random weights
written once as a Hugging Face safetensors folder that every implementation loads):
- prefill latency: one forward pass over [batch, 128] tokens, batch 1 and 8 (median of repeats,
  after a warm-up call; for JAX and TF the pass is compiled with jax.jit / tf.function(jit_compile));
- decode throughput: greedy `generate` from a 32-token prompt, 128 new tokens, batch 1 and 8:
  batch x new tokens / wall time (the 32-token prefill included), after a warm-up call;
- peak RSS of the process (each implementation and shape runs in its own subprocess, so this is
  framework + weights + work), and load and first-call (compile) times.

Implementations: this project's opt_torch, opt_tf and opt_flax (.venv); Hugging Face transformers
5.x torch with sdpa, CTranslate2 fp32 and int8 converted from the same folder, and ONNX Runtime fp32
and int8 on opt_torch's model exported to ONNX (benchmarks/ort_export.py) (.venv-bench, built from
requirements/bench.txt); Hugging Face 4.57.6 TF (XLA generate) and Flax (.venv-oracle). A missing
environment or package is reported as an error row, never silently dropped.

Writes BENCHMARKS.md (tables, ratios against each peer, machine, versions, date, command) and, with
--json OUT, the raw results. With --backend-scripts it also runs benchmarks/bench_{torch,tf,flax}.py
(the backends' own benchmarks, when present) and stores their JSON next to the results.

Only the standard library is imported at module level: the same file is the worker run inside each
environment (`run_all.py --worker '{...}'`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, VENVS, peak_rss_mb, prompt, run_in_env, write_checkpoint  # noqa: E402, F401
from runners import FRAMEWORKS, IMPLS, LOADERS, OURS, PEERS, REDUCED  # noqa: E402, F401


# ================================================================ worker (runs inside one environment)
def worker(job: dict) -> dict:
    """Load one implementation and measure it; returns the results dict (see the module docstring)."""
    impl, folder, threads = job["impl"], job["folder"], job["threads"]
    out: dict = {"impl": impl, "shape": job["shape"]}
    t0 = time.perf_counter()
    runner = LOADERS[impl](folder, threads)
    out["load_s"] = time.perf_counter() - t0
    if hasattr(runner, "convert_s"):
        out["convert_s"] = runner.convert_s
    out["prefill"] = {}
    for b in job["prefill_batches"]:
        ids, mask = prompt(b, job["prefill_len"])
        t = time.perf_counter()
        runner.prefill(ids, mask)
        first = time.perf_counter() - t
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            runner.prefill(ids, mask)
            times.append(time.perf_counter() - t)
        out["prefill"][str(b)] = {"ms": 1000 * statistics.median(times), "first_s": first}
    out["decode"] = {}
    for b in job["decode_batches"]:
        ids, mask = prompt(b, job["prompt_len"], seed=1)
        n = job["new_tokens"]
        t = time.perf_counter()
        runner.generate(ids, mask, n)  # warm-up at the measured shapes (compiles where needed)
        first = time.perf_counter() - t
        t = time.perf_counter()
        new = runner.generate(ids, mask, n)
        dt = time.perf_counter() - t
        out["decode"][str(b)] = {"tokens_per_s": b * new / dt, "new_tokens": new, "seconds": dt, "first_s": first}
    out["peak_rss_mb"] = peak_rss_mb()
    versions = {}
    for name in FRAMEWORKS:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            versions[name] = str(mod.__version__)
    out["versions"] = versions
    return out


# ================================================================ parent
def best_of_rounds(results: list[dict]) -> dict:
    """One implementation's runs -> its best figures (lowest times and RSS, highest tokens/s)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    best = json.loads(json.dumps(ok[0]))
    best["rounds"] = len(ok)
    for r in ok[1:]:
        for key in ("load_s", "peak_rss_mb", "convert_s"):
            if key in r and key in best:
                best[key] = min(best[key], r[key])
        for b, v in r.get("prefill", {}).items():
            best["prefill"][b]["ms"] = min(best["prefill"][b]["ms"], v["ms"])
            best["prefill"][b]["first_s"] = min(best["prefill"][b]["first_s"], v["first_s"])
        for b, v in r.get("decode", {}).items():
            if v["tokens_per_s"] > best["decode"][b]["tokens_per_s"]:
                best["decode"][b] = {**v, "first_s": min(v["first_s"], best["decode"][b]["first_s"])}
    return best


def run_job(job: dict, timeout: int) -> dict:
    """One implementation and shape, measured by this script's worker in the implementation's environment."""
    return run_in_env(__file__, IMPLS[job["impl"]][0], job, timeout, {"impl": job["impl"], "shape": job["shape"]})


def run_extra(name: str, quick: bool, timeout: int, threads: int) -> dict:
    """bench_attention.py / bench_scaling.py in .venv, bench_quant.py in .venv-bench (it needs
    CTranslate2 beside torch); returns their command and Markdown."""
    md = CACHE / f"{name}.md"
    md.unlink(missing_ok=True)
    venv = "bench" if name == "quant" else "main"
    extra = ["--rss"] if name == "quant" else []
    cmd = [str(VENVS[venv] / "bin" / "python"), str(ROOT / "benchmarks" / f"bench_{name}.py"),
           "--markdown", str(md), "--threads", str(threads), *extra, *(["--quick"] if quick else [])]
    shown = (f"{VENVS[venv].name}/bin/python benchmarks/bench_{name}.py --threads {threads}"
             + "".join(f" {x}" for x in extra) + (" --quick" if quick else ""))
    try:
        proc = subprocess.run(cmd, text=True, timeout=timeout * 4, cwd=ROOT, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except subprocess.TimeoutExpired:
        return {"command": shown, "error": f"timed out after {timeout * 4}s"}
    if not md.is_file():
        return {"command": shown, "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
    return {"command": shown, "markdown": md.read_text(), "exit": proc.returncode}


def run_backend_scripts(shapes: list[str], quick: bool, timeout: int, threads: int) -> dict:
    """The backends' own benchmark scripts (their issue-specific measurements), when present."""
    found = {}
    for name in ("torch", "tf", "flax"):
        script = ROOT / "benchmarks" / f"bench_{name}.py"
        if not script.is_file():
            found[name] = {"error": f"{script.name} is not there"}
            continue
        out = CACHE / f"bench_{name}.json"
        python = str(VENVS["main"] / "bin" / "python")
        helptext = subprocess.run([python, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
        cmd = [python, str(script), "--json", str(out)]
        if "--shapes" in helptext:  # bench_flax.py / bench_tf.py measure opt-125m only
            cmd += ["--shapes", ",".join(shapes)]
        if "--threads" in helptext and threads:
            cmd += ["--threads", str(threads)]
        if quick:  # each script's own knobs, where it has them
            for flag, value in (("--quick", None), ("--batches", "1"), ("--new-tokens", "16")):
                if flag in helptext:
                    cmd += [flag] + ([value] if value else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
            found[name] = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else {
                "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
            found[name]["command"] = " ".join(cmd[1:])
        except subprocess.TimeoutExpired:
            found[name] = {"error": f"timed out after {timeout}s"}
    return found


# ---------------------------------------------------------------- report
def _f(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def _get(r: dict, kind: str, batch: int, key: str):
    return r.get(kind, {}).get(str(batch), {}).get(key)


def results_table(runs: list[dict], shape: str, s: dict) -> list[str]:
    pb, db = s["prefill_batches"], s["decode_batches"]
    head = (["implementation", "load s"] + [f"prefill b{b} ms" for b in pb] + [f"decode b{b} tok/s" for b in db]
            + ["peak RSS MB", "first call s"])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|--:" * (len(head) - 1) + "|"]
    for r in runs:
        if r["shape"] != shape:
            continue
        label = IMPLS[r["impl"]][1]
        if "error" in r:
            lines.append(f"| {label} | " + " | ".join(["-"] * (len(head) - 2)) + f" | error: {r['error']} |")
            continue
        firsts = [_get(r, "decode", b, "first_s") for b in db]
        short = [b for b in db if (_get(r, "decode", b, "new_tokens") or 0) < s["new_tokens"]]
        note = f" (stopped early at b{short})" if short else ""
        cells = ([label, _f(r.get("load_s"))] + [_f(_get(r, "prefill", b, "ms")) for b in pb]
                 + [_f(_get(r, "decode", b, "tokens_per_s")) + (note if b in short else "") for b in db]
                 + [_f(r.get("peak_rss_mb"), 0), _f(max((x for x in firsts if x is not None), default=None))])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_table(runs: list[dict], shape: str, s: dict) -> list[str]:
    """ours vs peer: speed ratios (> 1: ours faster) and RSS ratio (< 1: ours smaller)."""
    by = {r["impl"]: r for r in runs if r["shape"] == shape and "error" not in r}
    pb, db = s["prefill_batches"], s["decode_batches"]
    head = (["ours vs peer"] + [f"prefill b{b}" for b in pb] + [f"decode b{b}" for b in db] + ["peak RSS"])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|--:" * (len(head) - 1) + "|"]
    for ours in OURS:
        for peer in PEERS:
            if ours in REDUCED and not peer.startswith(("ct2", "ort")):
                continue
            if ours not in by or peer not in by:
                continue
            a, p = by[ours], by[peer]
            cells = [f"{ours} vs {peer}"]
            for b in pb:  # latency: peer / ours
                x, y = _get(a, "prefill", b, "ms"), _get(p, "prefill", b, "ms")
                cells.append(f"{y / x:.2f}x" if x and y else "-")
            for b in db:  # throughput: ours / peer
                x, y = _get(a, "decode", b, "tokens_per_s"), _get(p, "decode", b, "tokens_per_s")
                cells.append(f"{x / y:.2f}x" if x and y else "-")
            x, y = a.get("peak_rss_mb"), p.get("peak_rss_mb")
            cells.append(f"{x / y:.2f}x" if x and y else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from opt_core.platform import cpu_info

    cpu = cpu_info()
    info["cpu"] = cpu.model_name
    info["simd"] = [f for f in SIMD_FLAGS if f in cpu.flags]  # what the matmul kernels can use
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gb"] = round(int(mem) / 1024**2, 1)
    except OSError:
        pass
    try:
        info["load_average"] = [round(x, 1) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def markdown(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    versions: dict[str, set] = {}
    for r in report["runs"]:
        for k, v in r.get("versions", {}).items():
            versions.setdefault(k, set()).add(v)
    md = [
        "# Benchmarks",
        "",
        f"Generated by `{report['command']}` on {report['date']} ({report['seconds']:.0f}s).",
        "",
        f"- machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs"
        + (f" ({' '.join(m['simd'])})" if m.get("simd") else "")
        + f", {m.get('memory_gb', '?')} GB RAM, "
        f"{m.get('platform')}, Python {m.get('python')}; load average at start {m.get('load_average')}",
        f"- threads: {s['threads'] or 'each framework default'} per implementation; fp32 everywhere except "
        "CTranslate2 int8, ONNX Runtime int8 and the reduced-precision rows of this project",
        "- versions: " + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(versions.items())),
        "- reduced precision (opt_torch bf16/int8/w8a8, opt_flax int8) is compared with CTranslate2 and ONNX "
        "Runtime only; "
        "int8/w8a8 are quantized at load from the same fp32 folder (kernels chosen by timing on this CPU)",
        "- ONNX Runtime: opt_torch's model with its key/value cache traced by torch.onnx (TorchScript exporter, "
        "opset 17), one graph for prefill and decode, greedy loop in NumPy (benchmarks/ort_export.py, runners._ORT); "
        "int8: quantize_dynamic of every weight MatMul, lm_head included (int8 per-channel weights, uint8 "
        "per-tensor dynamic activations), embeddings stored int8",
        "- weights: random (N(0, 0.02), opt_core.reference.random_parameters seed 0), one safetensors "
        "folder per shape loaded by every implementation; eos_token_id null so every row generates every token",
        f"- prefill: forward over [batch, {s['prefill_len']}] tokens, median of {s['repeats']} after a warm-up; "
        f"decode: greedy from a {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens, "
        f"batch x new tokens / wall time (prefill included), after a warm-up call at the same shapes",
        "- peak RSS: the whole subprocess (framework + weights + work), one subprocess per implementation "
        "and shape; first call: the warm-up generate (compilation for XLA/JAX paths)",
    ]
    if s.get("rounds", 1) > 1:
        md.append(f"- rounds: every implementation ran {s['rounds']} times, interleaved (order reversed each "
                  "round); each figure is its best round (the machine's speed drifts by up to 2x over minutes)")
    md.append("")
    if s.get("quick"):
        md += ["**Quick mode (smoke run): fewer shapes, batches and tokens; not the reference numbers.**", ""]
    for shape in s["shapes"]:
        md += [f"## {shape}", ""] + results_table(report["runs"], shape, s)
        md += ["", "Ratios, this project vs each peer (speed: > 1 means ours is faster; "
               "peak RSS: < 1 means ours uses less):", ""] + ratio_table(report["runs"], shape, s) + [""]
    titles = {"quant": "Reduced precision vs CTranslate2 and ONNX Runtime (one process, calls interleaved)",
              "attention": "Eager vs SDPA attention (opt_torch, opt-350m shape)",
              "scaling": "Decode speed and memory vs sequence length"}
    for name, res in report.get("extras", {}).items():
        md += [f"## {titles[name]}", "", f"`{res['command']}`" + (" (plot: benchmarks/results/scaling.png)"
                                                                  if name == "scaling" else ""), ""]
        md += [f"error: {res['error']}" if "error" in res else res["markdown"].strip(), ""]
    scripts = report.get("backend_scripts")
    if scripts:
        md += ["## The backends' own benchmark scripts", ""]
        for name, res in scripts.items():
            md.append(f"- bench_{name}.py: " + (f"error: {res['error']}" if "error" in res else
                                                f"`{res.get('command', '')}`, results in the JSON report"))
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="opt-125m, batch 1, 32 prefill / 16 new tokens")
    ap.add_argument("--shapes", default=None, help="comma-separated presets (default opt-125m,opt-350m)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    ap.add_argument("--new-tokens", type=int, help="override the decode length (default 128; quick 16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 0,
                    help="threads for every implementation (default: all CPUs; 0: each framework's default)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per implementation and shape")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every implementation this many times, interleaved (order reversed each round), "
                         "and report each one's best figures: robust to a transient slowdown of the machine")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown report")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the raw results")
    ap.add_argument("--no-prefill", action="store_true", help="decode only (no prefill latency rows)")
    ap.add_argument("--no-attention", action="store_true", help="skip bench_attention.py (eager vs SDPA)")
    ap.add_argument("--no-quant", action="store_true",
                    help="skip bench_quant.py (opt_torch bf16/int8/w8a8 vs CTranslate2, interleaved in one process)")
    ap.add_argument("--no-scaling", action="store_true", help="skip bench_scaling.py (speed/memory vs length)")
    ap.add_argument("--backend-scripts", action="store_true",
                    help="also run benchmarks/bench_{torch,tf,flax}.py and keep their JSON")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    shapes = args.shapes.split(",") if args.shapes else (["opt-125m"] if args.quick else ["opt-125m", "opt-350m"])
    settings = dict(
        shapes=shapes, quick=args.quick, threads=args.threads,
        prefill_batches=[] if args.no_prefill else [1] if args.quick else [1, 8],
        prefill_len=32 if args.quick else 128,
        decode_batches=[1] if args.quick else [1, 8], prompt_len=32,
        new_tokens=args.new_tokens or (16 if args.quick else 128),
        repeats=2 if args.quick else 3, rounds=args.rounds,
    )
    command = "python benchmarks/run_all.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), "settings": settings, "runs": []}
    started = time.time()
    for shape in shapes:
        print(f"== {shape}: writing/reusing the random checkpoint", flush=True)
        folder = write_checkpoint(shape)
        rounds: dict[str, list[dict]] = {impl: [] for impl in impls}
        order = [(r, i) for r in range(args.rounds) for i in (impls if r % 2 == 0 else impls[::-1])]
        for rnd, impl in order:
            job = dict(impl=impl, shape=shape, folder=str(folder), threads=args.threads,
                       **{k: settings[k] for k in ("prefill_batches", "prefill_len", "decode_batches",
                                                   "prompt_len", "new_tokens", "repeats")})
            t = time.time()
            r = run_job(job, args.timeout)
            rounds[impl].append(r)
            if args.rounds > 1:
                print(f"   [round {rnd + 1}/{args.rounds}]", end="")
            if "error" in r:
                print(f"   {impl:9s} ERROR {r['error']}", flush=True)
            else:
                pre = ", ".join(f"b{b} {_f(_get(r, 'prefill', b, 'ms'))} ms" for b in settings["prefill_batches"])
                dec = ", ".join(f"b{b} {_f(_get(r, 'decode', b, 'tokens_per_s'))} tok/s"
                                for b in settings["decode_batches"])
                print(f"   {impl:9s} prefill {pre}; decode {dec}; peak RSS {_f(r['peak_rss_mb'], 0)} MB "
                      f"({time.time() - t:.0f}s)", flush=True)
        report["runs"].extend(best_of_rounds(rounds[impl]) for impl in impls)
        if args.rounds > 1:
            report.setdefault("all_rounds", []).extend(r for impl in impls for r in rounds[impl])
    if args.backend_scripts:
        report["backend_scripts"] = run_backend_scripts(shapes, args.quick, args.timeout, args.threads)
    report["extras"] = {}
    for name, skip in (("quant", args.no_quant), ("attention", args.no_attention), ("scaling", args.no_scaling)):
        if not skip:
            print(f"== bench_{name}.py", flush=True)
            report["extras"][name] = run_extra(name, args.quick, args.timeout, args.threads)
    report["seconds"] = time.time() - started
    text = markdown(report)
    args.output.write_text(text)
    print()
    for shape in shapes:
        print("\n".join([f"## {shape}"] + results_table(report["runs"], shape, settings) + [""]
                        + ratio_table(report["runs"], shape, settings) + [""]))
    print(f"wrote {args.output}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
