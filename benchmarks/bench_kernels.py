"""The weight matmuls of one decode step, per kernel: what opt_torch chooses between on this CPU.

    python benchmarks/bench_kernels.py                    # opt-125m shapes, 2 threads, rows 1 and 8
    python benchmarks/bench_kernels.py --markdown out.md

For the 12 layers of the opt-125m shape (q/k/v fused [2304, 768], out_proj [768, 768], fc1 [3072, 768],
fc2 [768, 3072]), time the matmuls of one decode step with rows = batch 1 and 8, for each kernel:
fp32 in nn.Linear's layout (MKL) and input-major, oneDNN prepacked fp32 and bf16
(`torch.ops.mkldnn._linear_pointwise`, on nn.Linear's weights as opt_torch runs it, and prepacked
for reference), bf16
F.linear, int8 weight-only (`_weight_int8pack_mm`, fp32 and bf16 activations) and w8a8 in each
PyTorch quantized engine (the modules of opt_torch.quantize). Calls are interleaved kernel by
kernel over `--reps` rounds and each figure is the best round (robust to load from other
processes). The kernel choices opt_torch makes at load (opt_torch.kernels / opt_torch.quantize)
are printed below the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    import torch.nn.functional as F

    from opt_core.platform import cpu_info
    from opt_torch import kernels
    from opt_torch import quantize as Q

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, f = args.hidden, args.ffn
    shapes = [(3 * c, c), (c, c), (f, c), (c, f)]
    layers = [[(torch.randn(o, i) * 0.02, torch.zeros(o)) for o, i in shapes] for _ in range(args.layers)]

    def mkldnn(dtype):
        def prep(w, b):
            return torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), 8), b.to(dtype)
        return prep, lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p[0], p[1], "none", [], "")

    cands = {
        "fp32, nn.Linear layout (MKL)": (lambda w, b: (w, b), lambda x, p: F.linear(x, *p), torch.float32),
        "fp32, input-major layout": (lambda w, b: (w.t().contiguous().t(), b), lambda x, p: F.linear(x, *p),
                                     torch.float32),
        "fp32, oneDNN on nn.Linear layout (opt_torch.kernels.linear)": (
            lambda w, b: (w, b), lambda x, p: kernels.linear(x, *p, "onednn"), torch.float32),
        "fp32, oneDNN prepacked": (*mkldnn(torch.float32), torch.float32),
        "bf16, F.linear": (lambda w, b: (w.bfloat16(), b.bfloat16()), lambda x, p: F.linear(x, *p), torch.bfloat16),
        "bf16, oneDNN on nn.Linear layout": (lambda w, b: (w.bfloat16(), b.bfloat16()),
                                             lambda x, p: kernels.linear(x, *p, "onednn"), torch.bfloat16),
        "bf16, oneDNN prepacked": (*mkldnn(torch.bfloat16), torch.bfloat16),
        "int8 weight-only, fp32 activations": (
            lambda w, b: Q.Int8WeightOnlyLinear(*Q.quantize_per_channel(w), b, torch.float32), lambda x, m: m(x),
            torch.float32),
        "int8 weight-only, bf16 activations": (
            lambda w, b: Q.Int8WeightOnlyLinear(*Q.quantize_per_channel(w), b, torch.bfloat16), lambda x, m: m(x),
            torch.float32),
    }
    for engine in Q.available_w8a8_engines():
        cands[f"w8a8, {engine} engine"] = (lambda w, b, e=engine: Q.DynamicInt8Linear(w, b, e), lambda x, m: m(x),
                                           torch.float32)
    packed = {}
    for name, (prep, _call, _dt) in cands.items():
        try:
            packed[name] = [[prep(w, b) for w, b in layer] for layer in layers]
        except Exception as e:  # a kernel this build or CPU lacks
            print(f"{name}: unavailable ({type(e).__name__}: {str(e)[:80]})")
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for rnd in range(args.reps + 1):  # round 0 warms up and is not recorded
            for name, layer_list in packed.items():
                _prep, call, dt = cands[name]
                for m in (1, 8):
                    xs = {i: torch.randn(m, i).to(dt) for _o, i in shapes}
                    t = time.perf_counter()
                    for layer in layer_list:
                        for (_o, i), p in zip(shapes, layer):
                            call(xs[i], p)
                    ms = (time.perf_counter() - t) * 1e3
                    if rnd:
                        best[(name, m)] = min(best.get((name, m), float("inf")), ms)
    lines = [f"{args.layers} layers x (q/k/v, out_proj, fc1, fc2), hidden {c}, ffn {f}, {args.threads} threads, "
             f"best of {args.reps} interleaved rounds; {cpu_info().model_name}", "",
             "| weights | batch 1 ms | batch 8 ms |", "|---|--:|--:|"]
    lines += [f"| {name} | {best[(name, 1)]:.1f} | {best[(name, 8)]:.1f} |" for name in packed]
    w = layers[0][2][0]
    lines += ["", "opt_torch's choices on this CPU (timed at load, once per process): "
              f"fp32 {kernels.choose_linear(c, f, torch.float32)}, "
              f"bf16 {kernels.choose_linear(c, f, torch.bfloat16)}, "
              f"int8 activations {str(Q.choose_int8_activation(w)).removeprefix('torch.')}, "
              f"w8a8 engine {Q.choose_w8a8_engine(w)}"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
