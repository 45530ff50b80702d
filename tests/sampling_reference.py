"""A NumPy reference for seeded sampling: the model run by `opt_core.reference`, Hugging Face's
warpers in NumPy, and Gumbel-max over `opt_core.sampling`'s stream. Every backend's seeded
`generate(do_sample=True, seed=...)` must give these tokens."""

from __future__ import annotations

import numpy as np

from opt_core import sampling
from opt_core.reference import ReferenceOPTForCausalLM


def warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, top-k, top-p as Hugging Face's warpers (removed entries -inf), float32 [B, V]."""
    x = (logits / np.float32(temperature)).astype(np.float32)
    if top_k and top_k < x.shape[-1]:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x).astype(np.float32)
    if top_p < 1.0:
        order = np.argsort(x, axis=-1, kind="stable")
        sorted_x = np.take_along_axis(x, order, -1)
        p = np.exp(sorted_x - sorted_x.max(-1, keepdims=True))
        remove = np.cumsum(p / p.sum(-1, keepdims=True), -1) <= 1 - top_p
        remove[:, -1] = False
        out = x.copy()
        np.put_along_axis(out, order, np.where(remove, -np.inf, sorted_x), -1)
        x = out
    return x


def reference_sample(folder, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, seed: int,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos: int | None = None,
                     pad: int = 1) -> np.ndarray:
    """[B, T + generated] int64: seeded sampling with the full prompt re-run each step (no cache)."""
    model = ReferenceOPTForCausalLM.from_pretrained(folder)
    seq, m = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
    done = np.zeros(len(seq), bool)
    for step in range(max_new_tokens):
        logits = np.asarray(model(seq, attention_mask=m).logits[:, -1], np.float32)
        tok = sampling.sample_from_logits(warp(logits, temperature, top_k, top_p), seed, step)
        tok = np.where(done, pad, tok)
        seq = np.concatenate([seq, tok[:, None]], axis=1)
        m = np.concatenate([m, np.ones((len(m), 1), np.int64)], axis=1)
        if eos is not None:
            done |= tok == eos
            if done.all():
                break
    return seq
