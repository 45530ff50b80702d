"""KV caches: decoding token by token (or in chunks) over a cache equals one full pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt_core import Head
from opt_torch import DynamicCache, StaticCache
from tests.torch.helpers import model_and_reference
from tests.variants import CORE_VARIANTS, TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.torch


def _new_cache(kind, config, batch, length):
    return DynamicCache() if kind == "dynamic" else StaticCache(config, batch, length)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_cached_decoding_equals_full_pass(variant, attn, kind):
    config = VARIANTS[variant]
    model, _ = model_and_reference(config, Head.CAUSAL_LM, attn)
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits.numpy()
        cache = _new_cache(kind, config, ids.shape[0], ids.shape[1])
        # A 4-token chunk (prefill with padding), then one token at a time.
        out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache)
        steps = [out.logits.numpy()]
        for t in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                        past_key_values=out.past_key_values)
            steps.append(out.logits.numpy())
    assert out.past_key_values is cache and cache.get_seq_length() == ids.shape[1]
    cached = np.concatenate(steps, axis=1)
    assert relative_error(cached, full, mask) < TOLERANCE["float32"]


def test_cache_matches_reference_cache_and_legacy_round_trip():
    config = VARIANTS["post_ln_proj"]
    model, ref = model_and_reference(config, Head.BASE)
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    expected = ref(ids, mask).past_key_values
    legacy = out.past_key_values.to_legacy()
    assert len(legacy) == config.num_hidden_layers
    for (k, v), (rk, rv) in zip(legacy, expected):
        assert k.shape == rk.shape  # [B, H, S, D]
        # [B, H, S, D] -> [B, S, H, D] so the mask selects real positions
        assert relative_error(k.numpy().swapaxes(1, 2), rk.swapaxes(1, 2), mask) < TOLERANCE["float32"]
        assert relative_error(v.numpy().swapaxes(1, 2), rv.swapaxes(1, 2), mask) < TOLERANCE["float32"]
    again = DynamicCache.from_legacy(legacy)
    assert again.get_seq_length() == ids.shape[1]


def test_static_cache_is_preallocated_and_bounded():
    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    cache = StaticCache(config, batch_size=1, max_length=4)
    buffers = [k.data_ptr() for k in cache.keys]
    with torch.no_grad():
        model(input_ids=[[2, 5, 6]], past_key_values=cache)
        model(input_ids=[[7]], past_key_values=cache)
        assert [k.data_ptr() for k in cache.keys] == buffers
        with pytest.raises(ValueError, match="StaticCache"):
            model(input_ids=[[8]], past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="max_position_embeddings"):
        StaticCache(config, 1, config.max_position_embeddings + 1)


def test_cache_reorder_keeps_rows():
    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    for cache in (DynamicCache(), StaticCache(config, 3, ids.shape[1] + 1)):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            keys0 = [k[:, :, : ids.shape[1]].clone() for k, _ in _layers(cache)]
            cache.reorder(torch.tensor([2, 0, 1]))
            for before, (after, _) in zip(keys0, _layers(cache)):
                assert torch.equal(after[:, :, : ids.shape[1]], before[[2, 0, 1]])


def _layers(cache):
    if isinstance(cache, DynamicCache):
        return cache.layers
    return list(zip(cache.keys, cache.values))


def test_legacy_tuples_are_refused_with_a_hint():
    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    with pytest.raises(ValueError, match="from_legacy"):
        model(input_ids=[[5]], past_key_values=((torch.zeros(1), torch.zeros(1)),))


def _compiled_decode(backend: str):
    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    cache = StaticCache(config, ids.shape[0], ids.shape[1])
    positions = (torch.cumsum(mask, -1) * mask - 1)

    def step(tokens, pos, attn, c):
        return model(input_ids=tokens, position_ids=pos, attention_mask=attn, past_key_values=c,
                     use_cache=True, validate=False).logits

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        outs = [compiled(ids[:, t : t + 1], positions[:, t : t + 1], mask[:, : t + 1], cache)
                for t in range(ids.shape[1])]
    got = torch.cat(outs, dim=1).numpy()
    assert relative_error(got, full.numpy(), mask.numpy()) < TOLERANCE["float32"]


def test_static_cache_decode_step_traces_as_one_graph():
    # Dynamo captures the whole cached decode step without a graph break (fullgraph=True).
    _compiled_decode("eager")


@pytest.mark.slow
def test_static_cache_decode_step_with_inductor():
    _compiled_decode("inductor")


# ---------------------------------------------------------------- flash-attention-2 over a cache
def _flash_stand_in(monkeypatch, model, dense_kernel, varlen_kernel):
    """Route `model`'s attention through the flash path with CPU stand-ins for flash_attn's kernels."""
    import opt_torch.attention as attention

    def fake_flash(q, k, v, mask, dropout):
        return attention._flash_attention_packed(q, k, v, mask, dropout, dense_kernel, varlen_kernel)

    monkeypatch.setattr(attention, "flash_attention", fake_flash)
    for layer in model.model.decoder.layers:
        layer.self_attn.attn_implementation = "flash_attention_2"  # set directly: the check wants CUDA


def _top_left_flash(q, k, v, dropout_p, softmax_scale, causal):
    """flash_attn 2.0's rule: causal aligned top-left (query t sees keys 0..t whatever S is)."""
    t, s = q.shape[1], k.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * softmax_scale
    if causal:
        scores = scores.masked_fill(torch.arange(s)[None, :] > torch.arange(t)[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def _top_left_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
    outs = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        outs.append(_top_left_flash(qi[None], ki[None], vi[None], dropout_p, softmax_scale, causal)[0])
    return torch.cat(outs)


def _flash_chunk_errors(model, ref, padded, device="cpu", dtype=torch.float32):
    """{(cache kind, split): relative error of the chunked logits against the reference's full pass}."""
    from tests.common.test_cache_chunks import SPLITS, WIDTH, chunk_batch, chunk_bounds

    config = model.config
    ids, mask = chunk_batch(config.vocab_size, padded)
    want = ref(ids, mask).logits
    errors = {}
    for kind in ("dynamic", "static"):
        for split in SPLITS:
            cache = DynamicCache() if kind == "dynamic" else StaticCache(config, 3, WIDTH, dtype=dtype, device=device)
            logits = []
            with torch.no_grad():
                for a, b in chunk_bounds(split):
                    out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache)
                    logits.append(out.logits.float().cpu().numpy())
            errors[kind, split] = relative_error(np.concatenate(logits, axis=1), want, mask)
    return errors


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_flash_path_chunks_over_a_cache_with_cpu_stand_ins(monkeypatch, padded):
    """The flash path's (un)padding around flash_attn's kernels keeps a chunk over a non-empty cache
    equal to the full pass, given flash_attn's bottom-right causal alignment (stand-ins in
    tests/torch/test_modeling.py); with 2.0's top-left alignment the same chunks go wrong, which is
    why `check_attn_implementation` refuses flash_attn < 2.1."""
    from tests.torch.test_modeling import _naive_flash, _naive_flash_varlen

    config = VARIANTS["post_ln_proj"]
    model, ref = model_and_reference(config, Head.CAUSAL_LM, "sdpa")
    _flash_stand_in(monkeypatch, model, _naive_flash, _naive_flash_varlen)
    errors = _flash_chunk_errors(model, ref, padded)
    assert max(errors.values()) < TOLERANCE["float32"], errors
    _flash_stand_in(monkeypatch, model, _top_left_flash, _top_left_flash_varlen)
    wrong = _flash_chunk_errors(model, ref, padded)
    assert min(wrong.values()) > 100 * TOLERANCE["float32"], wrong


def test_flash_attention_refuses_flash_attn_before_2_1(monkeypatch):
    import sys
    import types

    import opt_torch.attention as attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: True)
    fake = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    fake.__version__ = "2.0.9"
    with pytest.raises(ValueError, match=r"flash_attn >= 2\.1 \(found 2\.0\.9\).*top-left"):
        attention.check_attn_implementation("flash_attention_2")
    fake.__version__ = "2.7.4.post1"
    attention.check_attn_implementation("flash_attention_2")


def _flash_attn_on_gpu() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not _flash_attn_on_gpu(), reason="flash_attention_2 runs on a CUDA GPU with flash_attn only")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_flash_attention_chunks_over_a_cache_on_gpu(padded):  # exercised whenever a GPU and flash_attn are present
    config = VARIANTS["pre_ln"]
    model, ref = model_and_reference(config, Head.CAUSAL_LM, "sdpa")
    model = model.to("cuda", torch.float16)
    model.set_attn_implementation("flash_attention_2")
    errors = _flash_chunk_errors(model, ref, padded, device="cuda", dtype=torch.float16)
    assert max(errors.values()) < TOLERANCE["float16"], errors
