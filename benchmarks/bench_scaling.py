"""Decode speed and peak memory against sequence length, per backend: a table and a PNG plot.

    python benchmarks/bench_scaling.py                      # opt_torch, opt_tf, opt_flax; 128..2048
    python benchmarks/bench_scaling.py --quick              # lengths 128 and 256, 8 new tokens
    python benchmarks/bench_scaling.py --impls opt_torch,hf_torch --lengths 512,2048 --png out.png

For a context length L (the sequence length reached at the end), the prompt is L - N tokens and N
tokens are generated greedily. Decode tokens/s excludes the prefill:
batch x (N - 1) / (time(generate N) - time(generate 1)), each the fastest of 2 timed calls after a
warm-up call at the same shapes. Peak memory is the peak RSS of a subprocess that runs one
(implementation, L) point, so it is framework + weights + cache + activations at that length.
Same random weights as run_all.py (common.write_checkpoint: real opt-125m shape by default, eos
off). Implementations from runners.py (peers need their venvs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (stdlib-only at import: checkpoint, prompts, environments, job runner)
import runners  # noqa: E402  (stdlib-only at import: the implementations' loaders)

ROOT = common.ROOT
DEFAULT_LENGTHS = (128, 256, 512, 1024, 2048)


def worker(job: dict) -> dict:
    runner = runners.LOADERS[job["impl"]](job["folder"], job["threads"])
    n, length, b = job["new_tokens"], job["length"], job["batch"]
    ids, mask = common.prompt(b, length - n)

    def timed(new: int) -> float:
        """Fastest of `repeats` timed calls: at long contexts the prefill is most of each call, and
        the difference of two single timings was dominated by its run-to-run noise."""
        runner.generate(ids, mask, new)  # warm-up (compiles at these shapes where needed)
        best = float("inf")
        for _ in range(job.get("repeats", 2)):
            t = time.perf_counter()
            got = runner.generate(ids, mask, new)
            best = min(best, time.perf_counter() - t)
            if got != new:
                raise RuntimeError(f"{job['impl']} generated {got} tokens, asked for {new}")
        return best

    t1, tn = timed(1), timed(n)
    return {"impl": job["impl"], "length": length, "prefill_s": t1,
            "decode_tokens_per_s": b * (n - 1) / max(tn - t1, 1e-9),
            "peak_rss_mb": common.peak_rss_mb()}


def run_point(job: dict, timeout: int) -> dict:
    """One point in its own subprocess of the implementation's environment."""
    base = {"impl": job["impl"], "length": job["length"]}
    return common.run_in_env(__file__, runners.IMPLS[job["impl"]][0], job, timeout, base)


def table(results: list[dict], impls: list[str], lengths: list[int]) -> str:
    by = {(r["impl"], r["length"]): r for r in results}

    def cell(impl: str, length: int, key: str, digits: int) -> str:
        r = by.get((impl, length), {})
        return "error" if "error" in r else (f"{r[key]:.{digits}f}" if key in r else "-")

    head = ["implementation"] + [f"L={n} tok/s" for n in lengths] + [f"L={n} RSS MB" for n in lengths]
    md = ["| " + " | ".join(head) + " |", "|---" + "|--:" * (len(head) - 1) + "|"]
    for impl in impls:
        md.append("| " + " | ".join([impl] + [cell(impl, n, "decode_tokens_per_s", 1) for n in lengths]
                                    + [cell(impl, n, "peak_rss_mb", 0) for n in lengths]) + " |")
    errors = [f"- {r['impl']} L={r['length']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(md + ([""] + errors if errors else []))


def plot(results: list[dict], impls: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in impls:
        pts = sorted((r["length"], r) for r in results if r["impl"] == impl and "error" not in r)
        if not pts:
            continue
        xs = [n for n, _ in pts]
        ax1.plot(xs, [r["decode_tokens_per_s"] for _, r in pts], marker="o", label=impl)
        ax2.plot(xs, [r["peak_rss_mb"] for _, r in pts], marker="o", label=impl)
    for ax, ylabel in ((ax1, "decode tokens/s"), (ax2, "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in results})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (prompt + new tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--impls", default=",".join(runners.OURS), help=f"from {','.join(runners.IMPLS)}")
    ap.add_argument("--shape", default="opt-125m")
    ap.add_argument("--lengths", type=_ints, default=None, help="context lengths (default 128..2048)")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per point (default 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    ap.add_argument("--quick", action="store_true", help="lengths 128,256 and 8 new tokens")
    ap.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.png")
    ap.add_argument("--markdown", type=Path, metavar="OUT")
    ap.add_argument("--json", type=Path, metavar="OUT")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in runners.IMPLS]
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}; choose from {list(runners.IMPLS)}")
    lengths = args.lengths or ([128, 256] if args.quick else list(DEFAULT_LENGTHS))
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    if min(lengths) <= new_tokens:
        ap.error(f"every length must exceed --new-tokens ({new_tokens})")
    folder = common.write_checkpoint(args.shape)
    results = []
    started = time.time()
    for impl in impls:
        for length in lengths:
            job = dict(impl=impl, folder=str(folder), threads=args.threads, new_tokens=new_tokens,
                       length=length, batch=args.batch)
            r = run_point(job, args.timeout)
            results.append(r)
            shown = r.get("error") or (f"{r['decode_tokens_per_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                                       f"prefill+1 {r['prefill_s']:.2f}s")
            print(f"{impl:9s} L={length:5d}: {shown}", flush=True)
    title = (f"{args.shape} shape, random weights, fp32, batch {args.batch}, {new_tokens} new tokens per point, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    text = f"{title}\n\n{table(results, impls, lengths)}"
    print()
    print(text)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, impls, args.png, title)
    print(f"\nplot: {args.png} ({time.time() - started:.0f}s)")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "results": results}, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
