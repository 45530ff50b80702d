"""XLA generation: greedy and beam against Hugging Face, sampling, eos handling, no retracing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from opt_tf.generation import GenerationSettings, compiled_generate_fn, warp_logits
from tests.golden import NEW_TOKENS, NUM_BEAMS, hf_golden
from tests.tf.helpers import golden_causal_lm
from tests.variants import CORE_VARIANTS

pytestmark = [pytest.mark.tf, pytest.mark.oracle]


def _greedy(variant):
    g = hf_golden(variant)
    return golden_causal_lm(variant).generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS).numpy()


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_greedy_matches_hf_torch_and_tf(variant):
    g = hf_golden(variant)
    out = _greedy(variant)
    np.testing.assert_array_equal(out, g.torch["greedy"])
    np.testing.assert_array_equal(out, g.tf["greedy"])


def test_second_call_with_the_same_shapes_does_not_retrace():
    model = golden_causal_lm("pre_ln")
    g = hf_golden("pre_ln")
    first = _greedy("pre_ln")
    settings = GenerationSettings(total_length=g.ids.shape[1] + NEW_TOKENS, top_k=0, eos_token_id=2, pad_token_id=1)
    fn = compiled_generate_fn(model, settings)
    traces = fn.experimental_get_tracing_count()
    assert traces == 1
    ids2 = np.where(g.mask == 1, (g.ids * 7) % 120 + 4, 1)  # other tokens, same shapes
    ids2[:, :][g.ids == 2] = 2
    model.generate(ids2, attention_mask=g.mask, max_new_tokens=NEW_TOKENS)
    again = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS).numpy()
    assert fn.experimental_get_tracing_count() == traces
    np.testing.assert_array_equal(again, first)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_beam_search_under_xla_matches_hf_torch(variant):
    g = hf_golden(variant)
    out = golden_causal_lm(variant).generate(
        g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, num_beams=NUM_BEAMS, early_stopping=True,
        length_penalty=1.0,
    )
    np.testing.assert_array_equal(out.numpy(), g.torch["beam"])


def test_eos_finishes_rows_and_pads_them():
    g = hf_golden("pre_ln")
    model = golden_causal_lm("pre_ln")
    free = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, eos_token_id=None).numpy()
    t = g.ids.shape[1]
    np.testing.assert_array_equal(free[:, : t + 1], _greedy("pre_ln")[:, : t + 1])
    new = free[:, t:]
    eos = int(new[0, 2])  # a token row 0 emits: every row that emits it stops there
    out = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos).numpy()
    expected = new.copy()
    stops = []
    for r in range(new.shape[0]):
        hit = np.flatnonzero(new[r] == eos)
        if hit.size:
            expected[r, hit[0] + 1 :] = 1  # pad id after eos
        stops.append(hit[0] + 1 if hit.size else NEW_TOKENS)
    width = max(stops)
    np.testing.assert_array_equal(out, np.concatenate([g.ids, expected[:, :width]], axis=1))


def _hf_warp(logits, temperature, top_k, top_p):
    """Hugging Face's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in NumPy."""
    x = logits / temperature
    if top_k:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(x, axis=-1, kind="stable")
    sorted_x = np.take_along_axis(x, order, -1)
    p = np.exp(sorted_x - sorted_x.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    remove = np.cumsum(p, -1) <= 1 - top_p
    remove[:, -1] = False
    out = x.copy()
    np.put_along_axis(out, order, np.where(remove, -np.inf, sorted_x), -1)
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)])
def test_warpers_follow_hf(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32) * 3
    got = warp_logits(tf.constant(logits), tf.constant(temperature), top_k, tf.constant(top_p)).numpy()
    want = _hf_warp(logits, np.float32(temperature), top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_sampling_is_seeded_and_respects_top_k():
    g = hf_golden("pre_ln")
    model = golden_causal_lm("pre_ln")
    kw = dict(attention_mask=g.mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=4.0, top_k=1,
              eos_token_id=None)
    a = model.generate(g.ids, seed=1, **kw).numpy()
    b = model.generate(g.ids, seed=2, **kw).numpy()
    greedy = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, eos_token_id=None).numpy()
    np.testing.assert_array_equal(a, greedy)  # top_k=1 leaves one candidate
    np.testing.assert_array_equal(b, greedy)
    kw["top_k"] = 0  # same compiled function for every seed and temperature
    c1 = model.generate(g.ids, seed=1, **kw).numpy()
    c2 = model.generate(g.ids, seed=1, **kw).numpy()
    c3 = model.generate(g.ids, seed=5, **{**kw, "temperature": 6.0}).numpy()
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(c1, c3)
    np.testing.assert_array_equal(c1[:, : g.ids.shape[1]], g.ids)


def test_generation_argument_errors():
    model = golden_causal_lm("pre_ln")
    g = hf_golden("pre_ln")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(g.ids, attention_mask=g.mask, max_new_tokens=60)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="beam sampling"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, num_beams=2)


@pytest.mark.torch
def test_greedy_matches_opt_torch():
    from opt_torch import OPTForCausalLM as TorchOPTForCausalLM

    g = hf_golden("post_ln_proj")
    torch_model = TorchOPTForCausalLM.from_pretrained(g.folder)
    theirs = torch_model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(_greedy("post_ln_proj"), np.asarray(theirs))
