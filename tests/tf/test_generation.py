"""XLA generation: greedy and beam against Hugging Face, HF's logits processors, the shared random
stream and seeded sampling, streamers, eos handling, no retracing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from opt_core import GenerationConfig, sampling
from opt_core.generation import reference_generate
from opt_core.reference import ReferenceOPTForCausalLM
from opt_tf import generation
from opt_tf.generation import GenerationSettings, compiled_generate_fn, warp_logits
from tests.golden import NEW_TOKENS, NUM_BEAMS, hf_golden
from tests.oracle import oracle_run
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
    settings = GenerationSettings(total_length=g.ids.shape[1] + NEW_TOKENS, top_k=0, num_eos=1)
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
    model = golden_causal_lm(variant)
    saved = model.generation_config if hasattr(model, "generation_config") else None
    try:
        out = _early_stopping(model, True).generate(
            g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, num_beams=NUM_BEAMS, length_penalty=1.0,
        )
    finally:
        model.generation_config = saved
    np.testing.assert_array_equal(out.numpy(), g.torch["beam"])


def test_eos_finishes_rows_and_pads_them():
    g = hf_golden("pre_ln")
    model = golden_causal_lm("pre_ln")
    free = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, eos_token_id=[]).numpy()
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


SEEDS = (0, 1, 2**32 + 5, 2**64 - 1, 123456789012345)


@pytest.mark.parametrize("jit", [False, True])
def test_random_stream_is_bit_identical_to_opt_core(jit):
    fn = tf.function(lambda w, step: (generation.random_bits(w, step, 3, 1000), generation.uniforms(w, step, 3, 1000)),
                     jit_compile=jit)
    for seed in SEEDS:
        for step in (0, 7, 2**31 - 1):
            bits, u = fn(tf.constant(generation.seed_words(seed)), tf.constant(step))
            assert bits.dtype == tf.uint32
            np.testing.assert_array_equal(bits.numpy(), sampling.random_bits(seed, step, 3, 1000))
            np.testing.assert_array_equal(u.numpy(), sampling.uniforms(seed, step, 3, 1000))


SAMPLING = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.95, eos_token_id=[], max_new_tokens=8)


@pytest.mark.slow  # tests/generation covers this in the default suite
def test_seeded_sampling_matches_the_numpy_reference_and_no_seed_is_fresh():
    g = hf_golden("pre_ln")
    model = golden_causal_lm("pre_ln")
    outs = []
    for seed in (3, 2**40 + 7):
        out = model.generate(g.ids, attention_mask=g.mask, seed=seed, **SAMPLING)
        assert out.dtype == tf.int64
        want = reference_generate(ReferenceOPTForCausalLM.from_pretrained(g.folder), g.ids, g.mask, seed=seed,
                                  **SAMPLING)
        np.testing.assert_array_equal(out.numpy(), want)
        outs.append(out.numpy())
    assert not np.array_equal(*outs)
    fresh = [model.generate(g.ids, attention_mask=g.mask, **SAMPLING).numpy() for _ in range(2)]
    assert not np.array_equal(*fresh)  # no seed: fresh randomness each call (same compiled function)


def _hf(g, **kw):
    return oracle_run(g.folder, [{"framework": "torch", "input_ids": g.ids, "attention_mask": g.mask,
                                  "generate": {"do_sample": False, "early_stopping": False, **kw}}])[0]["sequences"]


def _early_stopping(model, value):
    """Use `model` with generation_config.early_stopping = value (a keyword of the file, not of generate)."""
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.generation_config.early_stopping = value
    return model


def _eos_pair(g):
    """Two ids the greedy rows emit at different steps: an eos list that ends rows at different times."""
    new = g.torch["greedy"][:, g.ids.shape[1]:]
    return [int(new[0, 4]), int(new[2, 7])]


@pytest.mark.slow  # tests/generation covers this in the default suite
def test_logits_processors_and_eos_list_match_hf():
    g = hf_golden("pre_ln")
    kw = dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3,
              eos_token_id=_eos_pair(g))
    out = golden_causal_lm("pre_ln").generate(g.ids, attention_mask=g.mask, **kw)
    np.testing.assert_array_equal(out.numpy(), _hf(g, **kw))


@pytest.mark.slow  # tests/generation covers this in the default suite
def test_beam_search_length_penalty_and_eos_list_match_hf():
    g = hf_golden("pre_ln")
    kw = dict(max_new_tokens=12, num_beams=3, length_penalty=-3.0, eos_token_id=_eos_pair(g))
    out = golden_causal_lm("pre_ln").generate(g.ids, attention_mask=g.mask, **kw)  # early_stopping False: the default
    np.testing.assert_array_equal(out.numpy(), _hf(g, **kw))


class Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(np.asarray(value))

    def end(self):
        self.ended += 1


@pytest.mark.slow  # tests/generation covers this in the default suite
def test_streamer_gets_the_prompt_then_each_step_and_zero_new_tokens_returns_the_prompt():
    g = hf_golden("pre_ln")
    model = golden_causal_lm("pre_ln")
    rec = Recorder()
    out = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=6, streamer=rec).numpy()
    np.testing.assert_array_equal(out, _greedy("pre_ln")[:, : out.shape[1]])
    np.testing.assert_array_equal(rec.puts[0], g.ids)
    np.testing.assert_array_equal(np.stack(rec.puts[1:], axis=1), out[:, g.ids.shape[1]:])
    assert rec.ended == 1
    same = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=0)
    assert same.dtype == tf.int64
    np.testing.assert_array_equal(same.numpy(), g.ids)


def test_generation_argument_errors():
    model = golden_causal_lm("pre_ln")
    g = hf_golden("pre_ln")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(g.ids, attention_mask=g.mask, max_new_tokens=60)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="beam sampling"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, top_k=-5)
    with pytest.raises(ValueError, match="seed"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, seed=2**64)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(g.ids, attention_mask=g.mask, num_beams=2, streamer=Recorder())


@pytest.mark.torch
def test_greedy_matches_opt_torch():
    from opt_torch import OPTForCausalLM as TorchOPTForCausalLM

    g = hf_golden("post_ln_proj")
    torch_model = TorchOPTForCausalLM.from_pretrained(g.folder)
    theirs = torch_model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(_greedy("post_ln_proj"), np.asarray(theirs))
