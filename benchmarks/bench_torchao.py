"""opt_torch's weight-only int8/int4 modules against torchao's on the same random-weight checkpoint:
peak RSS of "load a float checkpoint and quantize it", and decode-step time of the decoder layers.

torchao is not a project dependency: run this with a Python that has it next to the project's torch,
e.g. a scratch venv whose site-packages has a .pth line pointing at .venv's and `pip install
--no-deps torchao`:

    PYTHONPATH=. /path/to/venv/bin/python benchmarks/bench_torchao.py --shape opt-125m

Peak RSS: each variant in a fresh process (VmHWM). "ours" is `from_pretrained(quantize=...)`, which
quantizes each layer as it is read; torchao's `quantize_` needs the float model loaded first. The
vocabulary matrix: ours stores it int8 (shared with the tied lm_head); torchao's weight-only configs
quantize Linear weights, so the embedding stays float (lm_head is left out of both timings).

Decode time: one process, both models built from the same float weights, only the decoder layers'
matmuls quantized in each (ours: `quantize_model(..., include_embeddings=False)`), one cached token
at batch 1 and 8, the variants interleaved and best-of-N so machine load falls on all alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

INT4_GROUP = 64  # opt_torch.quantize.INT4_GROUP_SIZE


def _torchao_config(mode: str):
    """torchao's CPU weight-only configs. int4: its stable Int4WeightOnlyConfig needs the CUDA-only
    mslk kernels (torchao 0.18); the CPU tinygemm path (`_weight_int4pack_mm_for_cpu`, the kernel ours
    calls) is its prototype config."""
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP)


def _torchao_quantize(model, mode: str) -> None:
    """torchao's weight-only quantization of the decoder layers' matmuls (q/k/v unfused first: torchao
    swaps each Linear's weight for a tensor subclass)."""
    from torchao.quantization import quantize_

    for layer in model.get_decoder().layers:
        layer.self_attn._qkv = None
    quantize_(model.get_decoder().layers, _torchao_config(mode))


def rss_worker(job: dict) -> dict:
    import torch

    from opt_torch import OPTForCausalLM

    torch.set_num_threads(job["threads"])
    if job["impl"] == "ours":
        model = OPTForCausalLM.from_pretrained(job["folder"], quantize=job["mode"])
    else:
        model = OPTForCausalLM.from_pretrained(job["folder"])
        if job["impl"] == "torchao":
            _torchao_quantize(model, job["mode"])
        elif job["impl"] == "float+torchao":  # what importing torchao alone costs
            import torchao  # noqa: F401
    with torch.no_grad():
        model(input_ids=[[2, 100, 200]])  # one call, so lazily built state counts too
    return {"peak_rss_mb": common.peak_rss_mb()}


def _decode_timer(model, batch: int, past: int = 16):
    import torch

    from opt_torch import DynamicCache

    ids = torch.randint(4, 1000, (batch, past))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=DynamicCache())
    cache = out.past_key_values
    step = torch.randint(4, 1000, (batch, 1))

    def run() -> None:
        with torch.no_grad():
            model(input_ids=step, past_key_values=cache)
            cache.crop(past)  # the same cache length every call

    return run


def speed(args: argparse.Namespace) -> dict:
    import torch

    from opt_torch import OPTForCausalLM
    from opt_torch.kernels import time_min
    from opt_torch.quantize import quantize_model

    torch.set_num_threads(args.threads)
    base = OPTForCausalLM.from_pretrained(args.folder).eval()
    out = {}
    for mode in args.modes:
        ours = quantize_model(copy.deepcopy(base), mode, include_embeddings=False)
        theirs = copy.deepcopy(base).eval()
        try:
            _torchao_quantize(theirs, mode)
            with torch.no_grad():
                theirs(input_ids=[[2, 100, 200]])
        except Exception as e:  # noqa: BLE001  (reported: e.g. no CPU kernel for this config)
            out[mode] = {"torchao_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            theirs = None
        for b in args.batches:
            fns = {"fp32": _decode_timer(base, b), "ours": _decode_timer(ours, b)}
            if theirs is not None:
                fns["torchao"] = _decode_timer(theirs, b)
            best = time_min(fns, reps=args.reps)
            out.setdefault(mode, {})[f"batch {b} ms"] = {k: round(v * 1e3, 2) for k, v in best.items()}
        del ours, theirs
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="opt-125m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--modes", default="int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--speed-only", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(rss_worker(json.loads(args.worker))))
        return
    args.modes = args.modes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.folder = str(common.write_checkpoint(args.shape))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rss = {}
    jobs = [("float", None), ("float+torchao", None), *[(i, m) for m in args.modes for i in ("ours", "torchao")]]
    for impl, mode in [] if args.speed_only else jobs:
        job = {"impl": impl, "mode": mode, "folder": args.folder, "threads": args.threads}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, env=env, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        rss[f"{impl} {mode or 'fp32'}"] = (json.loads(lines[-1])["peak_rss_mb"] if lines else
                                           proc.stderr.strip().splitlines()[-1][:200])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"shape": args.shape, "threads": args.threads, "started": started,
              "load_average": [round(x, 1) for x in os.getloadavg()], "peak_rss_mb": rss, "decode": speed(args)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
