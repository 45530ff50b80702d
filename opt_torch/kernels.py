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


def choose_input_major(hidden_size: int, ffn_dim: int, dtype: torch.dtype) -> bool:
    """Whether `F.linear` runs decode faster from input-major weights (`modeling.column_major`) than
    from nn.Linear's own [out, in] layout on this CPU, timed on fc1- and fc2-shaped stand-ins.
    `OPT_TORCH_WEIGHT_LAYOUT=input_major|output_major` forces it."""
    shapes = [bench_shape(ffn_dim, hidden_size), bench_shape(hidden_size, ffn_dim)]
    weights = [torch.randn(s, dtype=dtype) * 0.02 for s in shapes]
    inputs = {s: bench_inputs(w, dtype=dtype) for s, w in zip(shapes, weights)}
    layouts = {"output_major": weights, "input_major": [w.t().contiguous().t() for w in weights]}

    def run(ws: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
        return lambda _x: [F.linear(x, w) for w in ws for x in inputs[tuple(w.shape)]]

    key = ("weight layout", tuple(shapes), dtype, torch.get_num_threads())
    cands = {name: run(ws) for name, ws in layouts.items()}
    return pick_fastest(key, cands, [weights[0]], "OPT_TORCH_WEIGHT_LAYOUT") == "input_major"
