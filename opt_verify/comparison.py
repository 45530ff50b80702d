"""Comparing two implementations' runs on the same batch: logits and hidden states at real tokens
(relative error against the pair's baseline) and greedy tokens (first divergence, near-ties)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opt_core.arrays import to_numpy as core_to_numpy


def to_numpy(x: Any) -> np.ndarray:
    """A framework array (torch, TensorFlow, JAX or NumPy) as a float64 or int64 NumPy array
    (`opt_core.arrays.to_numpy`, widened for the comparisons)."""
    arr = core_to_numpy(x)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    return arr.astype(np.float64)


@dataclass
class _Run:
    """What one implementation produced on the batch."""

    model: Any
    logits: np.ndarray  # [B, T, V] float64
    hidden: list[np.ndarray]  # embeddings, each layer ([-1] after final LN / project_out)
    tokens: np.ndarray  # [B, T + new] int64


@dataclass
class PairResult:
    """The comparison of implementation `b` against baseline `a`."""

    a: str
    b: str
    tolerance: float
    logits_max_abs: float | None = None
    logits_rel: float | None = None
    hidden_labels: list[str] = field(default_factory=list)
    hidden_rel: list[float | None] = field(default_factory=list)  # None: shapes differ
    first_divergent_layer: str | None = None
    greedy_matched: int = 0  # positions equal before each row's first difference
    greedy_compared: int = 0  # positions compared (up to an end-of-sequence both reached)
    greedy_first_divergence: dict[str, int] | None = None  # {"row", "position"} (0 = first new token)
    greedy_near_tie: bool | None = None  # the first divergence is a tie within the tolerance
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # reported, not failing


def relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(max |actual - expected|, that divided by max |expected|) over positions where mask is 1."""
    keep = mask.astype(bool)
    a, e = actual[keep], expected[keep]
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return float("inf"), float("inf")
    diff = float(np.abs(a - e).max())
    return diff, diff / max(float(np.abs(e).max()), 1e-30)


def hidden_labels(count: int) -> list[str]:
    """Names of the hidden-state entries: embeddings, then layer 0 .. layer n-1."""
    return ["embeddings"] + [f"layer {i}" for i in range(count - 1)]


def _greedy(
    pair: PairResult, run_a: _Run, run_b: _Run, ids: np.ndarray, mask: np.ndarray, eos: int, tol: float
) -> None:
    prompt_len = ids.shape[1]
    new_a, new_b = run_a.tokens[:, prompt_len:], run_b.tokens[:, prompt_len:]
    first = None
    for row in range(ids.shape[0]):
        n = max(new_a.shape[1], new_b.shape[1])
        for pos in range(n):
            ta = int(new_a[row, pos]) if pos < new_a.shape[1] else None
            tb = int(new_b[row, pos]) if pos < new_b.shape[1] else None
            if ta is None and tb is None:
                break
            pair.greedy_compared += 1
            if ta != tb:
                if first is None:
                    first = (row, pos, ta, tb)
                break
            pair.greedy_matched += 1
            if ta == eos:  # both stopped here; what follows is padding or free continuation
                break
    if first is None:
        return
    row, pos, ta, tb = first
    pair.greedy_first_divergence = {"row": row, "position": pos}
    if ta is None or tb is None:
        pair.greedy_near_tie = False
        return
    # Re-run the baseline on the common prefix: a tie closer than the logit tolerance can break
    # either way in a correct implementation.
    real = ids[row][mask[row].astype(bool)]
    prefix = np.concatenate([real, new_a[row, :pos]])[None, :]
    logits, _ = run_a.model.forward(prefix, np.ones_like(prefix))
    last = logits[0, -1]
    gap = abs(float(last[ta]) - float(last[tb]))
    pair.greedy_near_tie = bool(gap <= 2 * tol * float(np.abs(last).max()))


def compare(
    a: str,
    b: str,
    run_a: _Run,
    run_b: _Run,
    ids: np.ndarray,
    mask: np.ndarray,
    tol: float,
    eos: int,
    hidden_decides: bool = True,
    greedy_decides: bool = True,
) -> PairResult:
    """Compare `b` against the baseline `a` (see the module docstring). With `hidden_decides`
    False, hidden states above the tolerance are reported (`first_divergent_layer`, `notes`) but
    do not fail the pair."""
    pair = PairResult(a, b, tol)
    if run_a.logits.shape != run_b.logits.shape:
        shapes = f"{list(run_a.logits.shape)} vs {list(run_b.logits.shape)}"
        pair.failures.append(f"logits shapes differ: {shapes}")
    else:
        pair.logits_max_abs, pair.logits_rel = relative_error(run_b.logits, run_a.logits, mask)
        if not pair.logits_rel <= tol:
            pair.failures.append(f"logits relative error {pair.logits_rel:.3g} > {tol:.3g}")

    if len(run_a.hidden) != len(run_b.hidden):
        pair.failures.append(f"{len(run_a.hidden)} vs {len(run_b.hidden)} hidden states")
    pair.hidden_labels = hidden_labels(min(len(run_a.hidden), len(run_b.hidden)))
    for label, ha, hb in zip(pair.hidden_labels, run_a.hidden, run_b.hidden):
        rel = relative_error(hb, ha, mask)[1] if ha.shape == hb.shape else None
        pair.hidden_rel.append(rel)
        if pair.first_divergent_layer is None and (rel is None or not rel <= tol):
            pair.first_divergent_layer = label
    if pair.first_divergent_layer is not None:
        i = pair.hidden_labels.index(pair.first_divergent_layer)
        rel = pair.hidden_rel[i]
        what = "shape differs" if rel is None else f"relative error {rel:.3g} > {tol:.3g}"
        message = f"hidden states diverge first at {pair.first_divergent_layer} ({what})"
        if hidden_decides or rel is None:
            pair.failures.append(message)
        else:
            pair.notes.append(message + "; diagnostic only at this dtype")

    _greedy(pair, run_a, run_b, ids, mask, eos, tol)
    if pair.greedy_first_divergence is not None and not pair.greedy_near_tie:
        d = pair.greedy_first_divergence
        message = f"greedy tokens differ at row {d['row']}, new token {d['position']}"
        (pair.failures if greedy_decides else pair.notes).append(message)
    pair.passed = not pair.failures
    return pair
