"""Tiny synthetic data shared by the training tests of every backend (the causal-LM blocks and the
tiny config live in opt_verify.training_curves, which scripts/ uses too)."""

from __future__ import annotations

import numpy as np

from opt_verify.training_curves import TINY_TRAIN, affine_blocks

__all__ = ["TINY_TRAIN", "affine_blocks", "classification_task", "qa_task"]

def classification_task(n: int = 64, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Label = 1 when token 7 occurs in the row; right-padded rows of varying length."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, length), 1, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        k = int(rng.integers(6, length + 1))
        row = rng.integers(8, 128, k)
        row[0] = 2
        if labels[i]:
            row[int(rng.integers(1, k))] = 7
        ids[i, :k], mask[i, :k] = row, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int64)}


def qa_task(n: int = 64, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """The answer span starts at token 5 and ends at token 6 (markers placed at random)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, 128, (n, length)).astype(np.int64)
    ids[:, 0] = 2
    start = rng.integers(1, length - 4, n)
    end = start + rng.integers(1, 4, n)
    ids[np.arange(n), start] = 5
    ids[np.arange(n), end] = 6
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "start_positions": start.astype(np.int64),
            "end_positions": end.astype(np.int64)}
