"""A chunk of several tokens over a non-empty cache gives the full pass's logits: every backend, every
attention path it runs here (torch: eager and SDPA; flash-attention-2 needs CUDA, see
tests/torch/test_modeling.py), every cache kind it has (torch: dynamic and static; TF and Flax:
static), with and without left padding, and the float64 reference through the same entry point.

This is what chunked prefill, prompt caching and assisted decoding stand on: query t of a chunk
after `past` cached tokens sits at slot past + t and must see keys 0..past+t, not 0..t (PyTorch's
`is_causal=True` aligns the triangle top-left, which is wrong as soon as past > 0).
Outputs are compared at real tokens only (padding positions are arbitrary)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from opt_core.params import Head
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from opt_verify.tolerances import TOLERANCES
from tests.variants import TOLERANCE, VARIANTS, relative_error

WIDTH = 7
# Chunk sizes of the 7 tokens: a prefix then one chunk (4+3, 1+6), a prefix then two chunks (2+2+3).
SPLITS = ((4, 3), (2, 2, 3), (1, 6))
GPU_ONLY = ("flash_attention_2",)  # needs CUDA: tests/torch/test_cache.py
VARIANT_NAMES = ("pre_ln", "post_ln_proj")  # 125m-like and 350m-like (projections, post-LN)


def chunk_batch(vocab_size: int, padded: bool) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of WIDTH tokens; with `padded`, rows of 7, 3 and 5 real tokens, left-padded (the
    3-token row is all padding in the first chunk of every split)."""
    rng = np.random.default_rng(1)
    lengths = (WIDTH, 3, 5) if padded else (WIDTH,) * 3
    ids = np.full((len(lengths), WIDTH), 1, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, WIDTH - n] = 2
        ids[i, WIDTH - n + 1 :] = rng.integers(4, vocab_size, n - 1)
        mask[i, WIDTH - n :] = 1
    return ids, mask


def chunk_bounds(split: tuple[int, ...]):
    start = 0
    for n in split:
        yield start, start + n
        start += n


def _new_cache(backend, model, kind: str, batch: int):
    if kind == "dynamic":
        return backend.package.DynamicCache()
    return backend.package.init_cache(model.config, batch, WIDTH + 2)  # a little room left over


def _attention_paths(backend) -> tuple[str | None, ...]:
    """The attention implementations `backend` offers and runs on CPU (torch: all but flash); None
    for a backend with one path only."""
    offered = getattr(backend.package, "ATTN_IMPLEMENTATIONS", None)
    return (None,) if offered is None else tuple(a for a in offered if a not in GPU_ONLY)


def _cache_kinds(backend) -> tuple[str, ...]:
    """Every backend has a static cache (`init_cache`); torch also a dynamic one."""
    return (("dynamic",) if hasattr(backend.package, "DynamicCache") else ()) + ("static",)


def _no_grad(backend):
    if backend.name != "torch":
        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def _chunked_logits(backend, model, ids, mask, split, cache) -> np.ndarray:
    """Logits [B, WIDTH, V] of `ids` fed chunk by chunk over `cache`, each chunk with the mask of
    every token so far."""
    logits = []
    with _no_grad(backend):
        for a, b in chunk_bounds(split):
            out = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache)
            cache = out.past_key_values
            logits.append(backend.to_numpy(out.logits))
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_chunks_over_a_cache_equal_the_full_pass(backend, variant, padded):
    config = VARIANTS[variant]
    params = random_parameters(config, Head.CAUSAL_LM, std=0.5)
    model = backend.build(config, Head.CAUSAL_LM, params)
    ref = ReferenceOPTForCausalLM(config, params)
    ids, mask = chunk_batch(config.vocab_size, padded)
    want = ref(ids, mask).logits
    failures = []
    paths = _attention_paths(backend)
    assert backend.name != "torch" or {"eager", "sdpa"} <= set(paths), paths  # SDPA was the broken one
    for attn in paths:
        if attn is not None:
            model.set_attn_implementation(attn)
        full = backend.forward(model, ids, attention_mask=mask)["logits"]
        assert relative_error(full, want, mask) < TOLERANCE["float32"], f"full pass, attention {attn}"
        for kind in _cache_kinds(backend):
            for split in SPLITS:
                cache = _new_cache(backend, model, kind, ids.shape[0])
                got = _chunked_logits(backend, model, ids, mask, split, cache)
                err = relative_error(got, want, mask)
                if not err < TOLERANCE["float32"]:
                    failures.append(f"attention {attn}, {kind} cache, chunks {split}: relative error {err:.2e}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_reference_chunks_over_its_cache_equal_its_full_pass(variant, padded):
    """The float64 spec takes and returns the same cache (per layer keys/values [B, H, S, D])."""
    config = VARIANTS[variant]
    ref = ReferenceOPTForCausalLM(config, random_parameters(config, Head.CAUSAL_LM, std=0.5))
    ids, mask = chunk_batch(config.vocab_size, padded)
    want = ref(ids, mask).logits
    for split in SPLITS:
        past, logits = None, []
        for a, b in chunk_bounds(split):
            out = ref(ids[:, a:b], mask[:, :b], past_key_values=past)
            past = out.past_key_values
            assert past[0][0].shape[2] == b  # keys of every token so far
            logits.append(out.logits)
        assert relative_error(np.concatenate(logits, axis=1), want, mask) < TOLERANCES["float64"].relative, split
