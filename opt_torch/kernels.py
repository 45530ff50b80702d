"""Choosing CPU matmul kernels by measuring them, once per process.

Which weight layout or kernel is fastest depends on the CPU, not on the model: on the same opt-125m
matrices at 2 threads, storing weights input-major made MKL's batch-1 decode matmuls ~0.8x the time
on an Intel Xeon but batch 8 25% slower on an AMD EPYC (issue 16). So the loaders time the
candidates on a matrix of the model's shape (rows 1 and 8: decode), interleaved and best-of-N so
that load from other processes falls on all of them alike, and keep the fastest. Each choice can be
forced with an environment variable (named in the function that makes it), e.g. to make a
benchmark reproducible.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("opt_torch")

_CHOICES: dict[tuple[Any, ...], str] = {}
_MAX_BENCH_ELEMENTS = 1 << 24  # a 64 MB fp32 stand-in at most: big enough to leave the caches


def time_min(fns: dict[str, Callable[[], Any]], reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` seconds per function, the functions interleaved, after one warm-up call each."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def bench_inputs(weight: torch.Tensor, rows: Sequence[int] = (1, 8), dtype: torch.dtype = torch.float32,
                 ) -> list[torch.Tensor]:
    """Random activations [m, in] for a weight [out, in], one per row count (decode batch sizes)."""
    return [torch.randn(m, weight.shape[1], dtype=dtype) for m in rows]


def pick_fastest(key: tuple[Any, ...], candidates: dict[str, Callable[[torch.Tensor], Any]],
                 inputs: list[torch.Tensor], env: str) -> str:
    """The name of the candidate (a function of one input) with the least total best-of time over
    `inputs`; remembered under `key` for the rest of the process. `env`, when set, forces a choice."""
    forced = os.environ.get(env)
    if forced:
        if forced not in candidates:
            raise ValueError(f"{env}={forced!r}; expected one of {sorted(candidates)}")
        return forced
    if key in _CHOICES:
        return _CHOICES[key]
    if len(candidates) == 1:
        _CHOICES[key] = next(iter(candidates))
        return _CHOICES[key]
    with torch.inference_mode():
        times = time_min({name: (lambda fn=fn: [fn(x) for x in inputs]) for name, fn in candidates.items()})
    choice = min(times, key=times.__getitem__)
    logger.info("%s: measured %s -> %s", key[0], {k: f"{v * 1e3:.3f} ms" for k, v in times.items()}, choice)
    _CHOICES[key] = choice
    return choice


def bench_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The model's matrix shape, rows cut so the stand-in stays under 64 MB (large models)."""
    return max(1, min(out_features, _MAX_BENCH_ELEMENTS // max(in_features, 1))), in_features


# The kernels `linear` runs for a model whose weights need no gradient, named as the env var takes them:
#   aten              F.linear on nn.Linear's [out, in] layout (ATen's BLAS: MKL in the x86 wheels)
#   aten_input_major  F.linear on input-major weights (`layout.column_major`): faster MKL decode on Intel
#   onednn            oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`) on the same [out, in]
#                     tensors, unpacked: no second copy, state_dict and training untouched
#   onednn_packed     oneDNN's matmul on weights reordered into its blocked format (`pack`), which
#                     replace the plain ones (no second copy): inference only, `Linear` unpacks them
#                     for training, state_dict, `.to()` and loading. Never chosen by timing, only on
#                     request (this variable, or `model.pack_weights()`): a packed weight is an
#                     opaque tensor (`.numpy()`, indexing and in-place edits fail), and whether a
#                     loaded model's weights are ordinary tensors must not depend on a measurement
LINEAR_KERNELS = ("aten", "aten_input_major", "onednn", "onednn_packed")
PACK_ROWS = 8  # the batch size oneDNN's packed format is tuned for: decode at batch 1-8 (issue 16)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not DTensor, not a quantized or other subclass


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> torch.Tensor:
    """`F.linear(x, weight, bias)` [..., in] -> [..., out], through oneDNN when `kernel` is "onednn",
    no gradient is being recorded and the tensors are plain CPU tensors of one dtype, or when the
    weight is packed (`pack`); otherwise through F.linear. The two agree to float rounding (a
    different summation order)."""
    if weight.is_mkldnn or (kernel == "onednn" and not torch.is_grad_enabled() and x.device.type == "cpu"
                            and type(weight) in _PLAIN and x.dtype == weight.dtype):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] reordered into oneDNN's blocked format for `PACK_ROWS`-row inputs: an
    opaque tensor of the same shape and dtype (`.to_dense()` gives the values back exactly)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def choose_linear(hidden_size: int, ffn_dim: int, dtype: torch.dtype) -> str:
    """The fastest of the kernels that keep ordinary weight tensors ("aten", "aten_input_major",
    "onednn") for decode-sized inputs on this CPU, timed on fc1- and fc2-shaped stand-ins at rows 1
    and 8. On an AMD EPYC (Zen 4) oneDNN ran the opt-125m step's matmuls in 0.66x of MKL's time at
    batch 1 and 8 (0.47x at batch 8 from packed weights); on an Intel Xeon MKL from input-major
    weights led (issue 16).
    `OPT_TORCH_LINEAR=<kernel>` forces the choice, "onednn_packed" included."""
    shapes = [bench_shape(ffn_dim, hidden_size), bench_shape(hidden_size, ffn_dim)]
    weights = [torch.randn(s, dtype=dtype) * 0.02 for s in shapes]
    inputs = {s: bench_inputs(w, dtype=dtype) for s, w in zip(shapes, weights)}
    layouts = {"aten": weights, "aten_input_major": [w.t().contiguous().t() for w in weights]}

    def run(ws: list[torch.Tensor], kernel: str) -> Callable[[torch.Tensor], Any]:
        return lambda _x: [linear(x, w, None, kernel) for w in ws for x in inputs[tuple(w.shape)]]

    cands = {name: run(ws, "aten") for name, ws in layouts.items()}
    if onednn_available() and dtype in (torch.float32, torch.bfloat16):
        try:
            with torch.inference_mode():
                run(weights, "onednn")(None)
            cands["onednn"] = run(weights, "onednn")
        except RuntimeError as e:  # a build or CPU without this oneDNN path (e.g. bf16 without AVX-512)
            logger.info("oneDNN linear unavailable for %s: %s", dtype, e)
    forced = os.environ.get("OPT_TORCH_LINEAR", "")
    if forced.startswith("onednn") and "onednn" not in cands:
        return "aten"  # forced, but this dtype or build has no oneDNN path
    if forced == "onednn_packed":
        return forced  # on request only: packed weights are opaque tensors (see `pack`)
    key = ("linear kernel", tuple(shapes), dtype, torch.get_num_threads())
    return pick_fastest(key, cands, [weights[0]], "OPT_TORCH_LINEAR")
