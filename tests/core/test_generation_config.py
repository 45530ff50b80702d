"""The generation contract's resolution and checks (opt_core.generation_config), and the NumPy
reference processors on hand-worked cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opt_core import GenerationConfig, OPTConfig, resolve_generation_options
from opt_core import generation as ref

CONFIG = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                   max_position_embeddings=40, word_embed_proj_dim=16, eos_token_id=2, pad_token_id=1)


def resolve(gen=None, prompt_length=4, **kw):
    return resolve_generation_options(CONFIG, gen, prompt_length=prompt_length, **kw)


def test_defaults_come_from_the_file_then_hugging_face(tmp_path):
    o = resolve()
    assert (o.max_new_tokens, o.min_new_tokens, o.do_sample) == (20, 0, False)
    assert (o.top_k, o.top_p, o.num_beams) == (50, 1.0, 1)
    assert (o.eos_token_ids, o.pad_token_id, o.seed, o.early_stopping) == ((2,), 1, None, False)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_k": 7, "max_length": 10, "min_length": 6, "eos_token_id": [5, 2],
         "early_stopping": "never", "typical_p": 0.5}))
    gen = GenerationConfig.from_pretrained(tmp_path, CONFIG)
    o = resolve(gen)
    assert (o.do_sample, o.top_k, o.max_new_tokens, o.min_new_tokens) == (True, 7, 6, 2)
    assert (o.eos_token_ids, o.pad_token_id, o.early_stopping) == ((5, 2), 1, "never")  # pad from config.json
    assert 0 <= o.seed < 2**64
    o = resolve(gen, top_k=0, max_new_tokens=3, do_sample=False, eos_token_id=[])
    assert (o.top_k, o.max_new_tokens, o.do_sample, o.eos_token_ids, o.seed) == (0, 3, False, (), None)
    gen.save_pretrained(tmp_path / "out")
    back = GenerationConfig.from_pretrained(tmp_path / "out", CONFIG)
    assert back == gen and back.extra["typical_p"] == 0.5


def test_missing_file_uses_the_model_config(tmp_path):
    gen = GenerationConfig.from_pretrained(tmp_path, CONFIG.replace(eos_token_id=None, pad_token_id=1))
    o = resolve(gen)
    assert o.eos_token_ids == () and o.pad_token_id == 1


def test_pad_falls_back_to_the_first_eos():
    gen = GenerationConfig(eos_token_id=[7, 2], pad_token_id=None)
    assert resolve(gen).pad_token_id == 7


def test_unseeded_sampling_draws_fresh_seeds():
    seeds = {resolve(do_sample=True).seed for _ in range(4)}
    assert len(seeds) == 4
    assert resolve(do_sample=True, seed=3).seed == 3


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=-5), r"top_k must be an integer >= 0 \(0 turns top-k filtering off\), got -5"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=37), "exceeds max_position_embeddings"),
    (dict(min_new_tokens=-2), "min_new_tokens must be an integer >= 0"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(num_beams=0), r"num_beams must be an integer in \[1, 256\]"),
    (dict(num_beams=2, do_sample=True), "beam sampling"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
    (dict(eos_token_id=-1), r"eos_token_id -1 is not a token id .* eos_token_id=\[\]"),
    (dict(eos_token_id=[2, "a"]), "eos_token_id must be a token id or a list"),
    (dict(pad_token_id=-1), "pad_token_id must be an integer >= 0"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=2**64), r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(streamer=3), "streamer must have put"),
    (dict(streamer=lambda t: None, num_beams=2), "streamer cannot be used with beam search"),
    (dict(length_penalty=float("nan")), "length_penalty must be finite"),
])
def test_every_bad_value_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        resolve(**kw)


def test_bad_file_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="early_stopping"):
        resolve(GenerationConfig(early_stopping="sometimes"))
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        GenerationConfig.from_pretrained(tmp_path, CONFIG)


# ---------------------------------------------------------------- the NumPy processors, by hand
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], dtype=np.float32)
    out = ref.apply_repetition_penalty(logits, np.array([[0, 1, 1]]), 2.0)
    np.testing.assert_array_equal(out, [[1.0, -4.0, 1.0, 0.5]])


def test_no_repeat_ngram_bans_what_followed_the_tail():
    seq = np.array([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    banned = ref.banned_ngram_mask(seq, 3, 10)
    assert np.flatnonzero(banned[0]).tolist() == [7] and not banned[1].any()
    assert np.flatnonzero(ref.banned_ngram_mask(seq, 1, 10)[1]).tolist() == [1, 2, 3, 4, 5]
    assert not ref.banned_ngram_mask(seq[:, :1], 3, 10).any()


def test_min_new_tokens_and_warpers():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]], dtype=np.float32))
    assert np.isinf(ref.apply_min_new_tokens(logits, 1, 2, (0, 3))[0, [0, 3]]).all()
    assert ref.apply_min_new_tokens(logits, 2, 2, (0,)) is logits
    assert np.isfinite(ref.apply_top_k(logits, 2)).sum() == 2
    assert np.isfinite(ref.apply_top_p(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert np.isfinite(ref.apply_top_p(logits, 0.1)).sum() == 1
    np.testing.assert_allclose(ref.apply_temperature(logits, 2.0), logits / 2)
