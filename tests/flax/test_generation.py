"""Generation: HF-identical greedy and beam tokens, HF's logits processors, the shared random stream
and seeded sampling, streamers, eos handling, and no recompiles."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from opt_core import GenerationConfig, sampling
from opt_core.generation import reference_generate
from opt_core.reference import ReferenceOPTForCausalLM
from opt_flax import generation
from opt_flax.generation import compilation_count
from tests.flax.helpers import golden_model
from tests.golden import NEW_TOKENS, hf_golden
from tests.oracle import oracle_run

pytestmark = pytest.mark.flax


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_greedy_matches_hf_torch_and_flax(variant):
    g = hf_golden(variant)
    out = np.asarray(golden_model(variant).generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS))
    np.testing.assert_array_equal(out, g.torch["greedy"])
    # HF Flax always returns max_length columns, pad-filled after every row finished.
    np.testing.assert_array_equal(out, g.flax["greedy"][:, : out.shape[1]])
    assert (g.flax["greedy"][:, out.shape[1]:] == 1).all()


@pytest.mark.parametrize("variant", ["pre_ln", pytest.param("post_ln_proj", marks=pytest.mark.slow)])
def test_beam_search_matches_hf_torch(variant):
    g = hf_golden(variant)
    model = golden_model(variant)
    saved = model.generation_config
    try:
        out = _early_stopping(model, True).generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS,
                                                    num_beams=3)
    finally:
        model.generation_config = saved
    np.testing.assert_array_equal(np.asarray(out), g.torch["beam"])


def test_second_generate_does_not_recompile():
    g = hf_golden("pre_ln")
    model = golden_model("pre_ln")
    first = np.asarray(model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS))
    before = compilation_count()
    model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS)
    # A wider prompt in the same shape bucket (widths 9 and 12 both pad to 16) reuses the compiled
    # code too, and the extra left padding changes no token.
    ids = np.concatenate([np.ones((3, 3), g.ids.dtype), g.ids], axis=1)
    mask = np.concatenate([np.zeros((3, 3), g.mask.dtype), g.mask], axis=1)
    wider = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS))
    assert compilation_count() == before
    np.testing.assert_array_equal(wider[:, 3:], first)


def test_eos_rows_are_padded_and_output_stops_when_all_finished():
    g = hf_golden("pre_ln")
    model = golden_model("pre_ln")
    free = np.asarray(model.generate(g.ids, attention_mask=g.mask, max_new_tokens=12))
    new = free[:, g.ids.shape[1]:]
    eos = int(new[0, 3])  # a token row 0 produces: make it the eos
    out = np.asarray(model.generate(g.ids, attention_mask=g.mask, max_new_tokens=12, eos_token_id=eos))
    expected, done = [], np.zeros(len(new), bool)
    for t in range(new.shape[1]):
        if done.all():
            break
        col = np.where(done, 1, new[:, t])
        expected.append(col)
        done |= col == eos
    np.testing.assert_array_equal(out[:, g.ids.shape[1]:], np.stack(expected, axis=1))


SEEDS = (0, 1, 2**32 + 5, 2**64 - 1, 123456789012345)


def test_random_stream_is_bit_identical_to_opt_core():
    jitted = jax.jit(lambda w, step: (generation.random_bits(w, step, 3, 1000), generation.uniforms(w, step, 3, 1000)))
    for seed in SEEDS:
        for step in (0, 7, 2**31 - 1):
            want_bits, want_u = sampling.random_bits(seed, step, 3, 1000), sampling.uniforms(seed, step, 3, 1000)
            words = generation.seed_words(seed)
            for bits, u in (jitted(words, np.int32(step)),
                            (generation.random_bits(words, step, 3, 1000), generation.uniforms(words, step, 3, 1000))):
                assert bits.dtype == np.uint32
                np.testing.assert_array_equal(np.asarray(bits), want_bits)
                np.testing.assert_array_equal(np.asarray(u), want_u)


SAMPLING = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.95, eos_token_id=[], max_new_tokens=8)


@pytest.mark.slow  # tests/generation covers this in the default suite
def test_seeded_sampling_matches_the_numpy_reference_and_no_seed_is_fresh():
    g = hf_golden("pre_ln")
    model = golden_model("pre_ln")
    outs = []
    for seed in (3, 2**40 + 7):
        out = model.generate(g.ids, attention_mask=g.mask, seed=seed, **SAMPLING)
        assert out.dtype == np.int64
        want = reference_generate(ReferenceOPTForCausalLM.from_pretrained(g.folder), g.ids, g.mask, seed=seed,
                                  **SAMPLING)
        np.testing.assert_array_equal(out, want)
        outs.append(out)
    assert not np.array_equal(*outs)
    fresh = [model.generate(g.ids, attention_mask=g.mask, **SAMPLING) for _ in range(2)]
    assert not np.array_equal(*fresh)  # no seed: fresh randomness each call


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


@pytest.mark.oracle
@pytest.mark.slow  # tests/generation covers this in the default suite
def test_logits_processors_and_eos_list_match_hf():
    g = hf_golden("pre_ln")
    kw = dict(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3,
              eos_token_id=_eos_pair(g))
    out = golden_model("pre_ln").generate(g.ids, attention_mask=g.mask, **kw)
    np.testing.assert_array_equal(out, _hf(g, **kw))


@pytest.mark.oracle
@pytest.mark.slow  # tests/generation covers this in the default suite
def test_beam_search_length_penalty_and_eos_list_match_hf():
    g = hf_golden("pre_ln")
    kw = dict(max_new_tokens=12, num_beams=3, length_penalty=-3.0, eos_token_id=_eos_pair(g))
    out = golden_model("pre_ln").generate(g.ids, attention_mask=g.mask, **kw)  # early_stopping False: the default
    np.testing.assert_array_equal(out, _hf(g, **kw))


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
    model = golden_model("pre_ln")
    rec = Recorder()
    out = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, streamer=rec)
    np.testing.assert_array_equal(out, g.torch["greedy"])
    np.testing.assert_array_equal(rec.puts[0], g.ids)
    np.testing.assert_array_equal(np.stack(rec.puts[1:], axis=1), out[:, g.ids.shape[1]:])
    assert rec.ended == 1
    same = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=0)
    assert same.dtype == np.int64
    np.testing.assert_array_equal(same, g.ids)


def test_generate_rejects_too_long_requests():
    g = hf_golden("pre_ln")
    model = golden_model("pre_ln")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(g.ids, attention_mask=g.mask, max_new_tokens=60)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, top_k=-5)
    with pytest.raises(ValueError, match="seed"):
        model.generate(g.ids, attention_mask=g.mask, do_sample=True, seed=-1)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(g.ids, attention_mask=g.mask, num_beams=2, streamer=Recorder())
    with pytest.raises(TypeError):
        model.generate(g.ids, attention_mask=g.mask, prng_key=jax.random.key(0))  # one seeding spelling: seed


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_updates_the_cache_in_place(batch):
    """The compiled while loop holds no copy of a key/value buffer: each step writes one slot in
    place. (At batch 1, XLA CPU used to copy every buffer twice per step: ~300 MB per token for
    opt-125m at 2048 slots.)"""
    import jax.numpy as jnp
    from flax import nnx

    model = golden_model("pre_ln")
    cfg = model.config
    slots, new = 24, 8
    ids = jnp.full((batch, slots - new), 5, jnp.int32)
    mask = jnp.ones((batch, slots), jnp.int32)
    graphdef, state = nnx.split(model)
    logits, cache = generation.prefill(graphdef, state, ids, mask, slots)
    kw = dict(prompt=ids, first=jnp.int32(0), seen=None, max_new_tokens=new, do_sample=False,
              eos_ids=jnp.array([-1], jnp.int32), pad_token_id=jnp.int32(1), seed=generation.seed_words(0),
              temperature=jnp.float32(1.0), top_k=jnp.int32(0), top_p=jnp.float32(1.0),
              repetition_penalty=jnp.float32(1.0), min_new_tokens=jnp.int32(0))
    hlo = generation.greedy_or_sample_loop.lower(graphdef, state, logits, cache, mask, **kw).compile().as_text()
    body_name = re.search(r"body=(%[\w.\-]+)", hlo).group(1)
    body = hlo[hlo.index(f"\n{body_name} ") :]
    body = body[: body.index("\n}")]  # the while body computation
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    shapes = (f"[{batch},{heads},{slots},{head_dim}]", f"[{heads},{slots},{head_dim}]")
    copies = [ln.strip() for ln in body.splitlines() if " copy(" in ln and any(x in ln for x in shapes)]
    assert "dynamic-update-slice" in body
    assert copies == [], f"{len(copies)} cache copies per step, e.g. {copies[0][:120]}"
