"""opt_torch against Hugging Face transformers 5.x (sdpa, fp32) and CTranslate2 (fp32) on CPU.

    .venv/bin/python benchmarks/bench_torch.py                       # opt-125m and opt-350m shapes
    .venv/bin/python benchmarks/bench_torch.py --shapes opt-125m --repeats 1 --json bench-out/torch.json

Random weights with the real config shapes (data/opt-configs; eos disabled so every
implementation generates every requested token) are written once as a Hugging Face safetensors
folder under bench-out/; every implementation loads that same folder (CTranslate2 after its own
converter). Each implementation x shape runs in its own subprocess, so peak RSS is per process
(interpreter + framework + weights + work). Measured, after a warm-up call:
- prefill: a [1, 128] prompt to its next-token logits (torch: forward with logits_to_keep=1;
  CTranslate2: generate_batch with max_length 1), median ms;
- decode: greedy generation from a [B, 32] prompt, 128 new tokens, B = 1 and 8:
  B x 128 / wall time of the whole call (prefill of the prompt included), median over repeats;
- peak RSS (MiB), load time.

Peers run from .venv-bench (requirements/bench.txt). A missing peer is reported as an error row,
never silently dropped. Threads: --threads (default 2) for every implementation.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, format_table, ratio, run_worker, time_call, worker_main  # noqa: E402

OUT = ROOT / "bench-out"
CONFIGS = ROOT / "data" / "opt-configs"
TOKENIZER = ROOT / "data" / "opt-tokenizer"
PYTHONS = {"opt_torch": ROOT / ".venv" / "bin" / "python", "hf": ROOT / ".venv-bench" / "bin" / "python",
           "ct2": ROOT / ".venv-bench" / "bin" / "python"}
LABELS = {"opt_torch": "opt_torch (this project)", "hf": "HF transformers 5.x (sdpa)", "ct2": "CTranslate2 fp32"}
TOKENIZER_VOCAB = 50265


# ================================================================ workers (one per process)
def _prompt(batch: int, length: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(4, TOKENIZER_VOCAB, (batch, length)).astype(np.int64)
    ids[:, 0] = 2  # </s> starts every OPT prompt
    return ids, np.ones_like(ids)


class TorchRunner:
    """opt_torch and Hugging Face torch take the same calls."""

    def __init__(self, impl: str, folder: str, threads: int, compile_step: bool = False):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        if impl == "opt_torch":
            from opt_torch import OPTForCausalLM

            self.model = OPTForCausalLM.from_pretrained(folder, dtype="float32")
            self.kwargs: dict = {}
        else:
            from transformers import OPTForCausalLM

            self.model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
            self.model.generation_config.pad_token_id = 1
            self.kwargs = {"do_sample": False}
        self.model.eval()

    def prefill(self, ids, mask):
        t = self.torch
        with t.inference_mode():  # what generation needs from a prompt: the last position's logits
            self.model(input_ids=t.from_numpy(ids), attention_mask=t.from_numpy(mask), logits_to_keep=1)

    def generate(self, ids, mask, new_tokens: int) -> int:
        t = self.torch
        with t.inference_mode():
            out = self.model.generate(t.from_numpy(ids), attention_mask=t.from_numpy(mask),
                                      max_new_tokens=new_tokens, **self.kwargs)
        return int(out.shape[1]) - ids.shape[1]


class CT2Runner:
    def __init__(self, folder: str, threads: int):
        import ctranslate2

        out = Path(folder).with_name(Path(folder).name + "-ct2-float32")
        t0 = time.perf_counter()
        if not (out / "model.bin").is_file():
            from ctranslate2.converters import TransformersConverter

            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            TransformersConverter(str(folder)).convert(str(tmp), quantization="float32")
            tmp.rename(out)
        self.convert_s = time.perf_counter() - t0
        self.gen = ctranslate2.Generator(str(out), device="cpu", compute_type="float32",
                                         intra_threads=threads, inter_threads=1)
        vocab = out / "vocabulary.json"
        self.vocab = (json.loads(vocab.read_text()) if vocab.is_file()
                      else (out / "vocabulary.txt").read_text(encoding="utf-8").split("\n"))

    def prefill(self, ids, mask):  # the prompt and its first new token
        self.gen.generate_batch([[self.vocab[i] for i in row] for row in ids], max_length=1, min_length=1,
                                sampling_topk=1, include_prompt_in_result=False)

    def generate(self, ids, mask, new_tokens: int) -> int:
        tokens = [[self.vocab[i] for i in row] for row in ids]
        res = self.gen.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                      include_prompt_in_result=False)
        return max(len(r.sequences_ids[0]) for r in res)


def measure(job: dict) -> dict:
    """One implementation on one shape (runs inside the worker process)."""
    impl, folder, threads = job["impl"], job["folder"], job["threads"]
    t0 = time.perf_counter()
    runner = CT2Runner(folder, threads) if impl == "ct2" else TorchRunner(impl, folder, threads)
    out: dict = {"impl": impl, "shape": job["shape"], "load_s": time.perf_counter() - t0}
    ids, mask = _prompt(1, job["prefill_len"])
    out["prefill_ms"] = 1000 * time_call(lambda: runner.prefill(ids, mask), job["repeats"])["median_s"]
    out["decode"] = {}
    for batch in job["batches"]:
        ids, mask = _prompt(batch, job["prompt_len"], seed=batch)
        runner.generate(ids, mask, 8)  # warm-up
        got: dict = {}

        def run(ids=ids, mask=mask, got=got):
            got["new"] = runner.generate(ids, mask, job["new_tokens"])

        timing = time_call(run, job["repeats"], warmup=0)
        if got["new"] != job["new_tokens"]:
            raise RuntimeError(f"{impl} generated {got['new']} tokens, not {job['new_tokens']}")
        out["decode"][str(batch)] = {"tokens_per_s": batch * got["new"] / timing["median_s"],
                                     "seconds": timing["median_s"]}
    versions = {}
    for name in ("torch", "transformers", "ctranslate2"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    out["versions"] = versions
    return out


# ================================================================ parent
def write_weights(shape: str, seed: int = 0) -> Path:
    """The random-weight HF folder for `shape` (opt_torch's init, std 0.02), written once."""
    folder = OUT / "weights" / f"{shape}-seed{seed}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch

    from opt_core import OPTConfig
    from opt_torch import OPTForCausalLM

    config = OPTConfig.from_pretrained(CONFIGS / f"{shape}.config.json").replace(eos_token_id=None)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100GB")
    del model
    for name in ("vocab.json", "merges.txt"):  # CTranslate2's converter reads the vocabulary
        shutil.copy(TOKENIZER / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def report(results: list[dict], args) -> str:
    lines = []
    for shape in args.shapes:
        rows = {r["impl"]: r for r in results if r.get("shape") == shape}
        ours = rows.get("opt_torch", {})
        table = []
        for impl in args.impls:
            r = rows.get(impl, {})
            if "error" in r:
                table.append([LABELS[impl], "error: " + r["error"].splitlines()[-1][:80]] + [None] * 5)
                continue
            d = r.get("decode", {})
            table.append([LABELS[impl], r.get("prefill_ms"), d.get("1", {}).get("tokens_per_s"),
                          d.get("8", {}).get("tokens_per_s"), r.get("peak_rss_mb"), r.get("load_s")])
        lines.append(f"### {shape} (threads {args.threads}, prompt {args.prompt_len}, {args.new_tokens} new tokens)\n")
        lines.append(format_table(
            ["implementation", "prefill 128 ms", "decode b1 tok/s", "decode b8 tok/s", "peak RSS MiB", "load s"],
            table))
        ratios = []
        for peer in [p for p in args.impls if p != "opt_torch"]:
            p = rows.get(peer, {})
            if "error" in p or not p or "error" in ours or not ours:
                continue
            pd, od = p.get("decode", {}), ours.get("decode", {})
            ratios.append([
                f"opt_torch / {LABELS[peer]}",
                ratio(p.get("prefill_ms"), ours.get("prefill_ms")),  # speed-up = their time / ours
                ratio(od.get("1", {}).get("tokens_per_s"), pd.get("1", {}).get("tokens_per_s")),
                ratio(od.get("8", {}).get("tokens_per_s"), pd.get("8", {}).get("tokens_per_s")),
                ratio(ours.get("peak_rss_mb"), p.get("peak_rss_mb")),
            ])
        if ratios:
            lines.append("\nRatios (> 1 = opt_torch faster; RSS < 1 = opt_torch smaller):\n")
            lines.append(format_table(["", "prefill speed-up", "decode b1", "decode b8", "peak RSS"], ratios))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if "--worker" in sys.argv:
        worker_main(measure)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="opt-125m,opt-350m")
    ap.add_argument("--impls", default="opt_torch,hf,ct2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=OUT / "bench_torch.json")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.impls = args.impls.split(",")
    batches = [int(b) for b in args.batches.split(",")]

    results = []
    for shape in args.shapes:
        folder = write_weights(shape)
        for impl in args.impls:
            job = {"impl": impl, "shape": shape, "folder": str(folder), "threads": args.threads,
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
                   "batches": batches, "repeats": args.repeats}
            t = time.perf_counter()
            res = run_worker(PYTHONS[impl], __file__, job, timeout=args.timeout,
                             env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
            res.setdefault("impl", impl)
            res.setdefault("shape", shape)
            print(f"{shape} {impl}: {time.perf_counter() - t:.0f} s "
                  f"{res.get('error', '').splitlines()[-1] if 'error' in res else ''}", flush=True)
            results.append(res)
    text = report(results, args)
    print("\n" + text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results, "table": text}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
