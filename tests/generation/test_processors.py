"""Each logits processor and sampling warper, in NumPy (opt_core.generation) and in every backend,
against Hugging Face 4.57.6's own classes on the same scores: the same entries filtered (-inf) and
the same values elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import generation as ref
from tests.generation.backends import ENABLED
from tests.oracle import oracle_processors

pytestmark = pytest.mark.oracle

RNG = np.random.default_rng(7)
VOCAB, ROWS, LENGTH = 48, 4, 12
IDS = RNG.integers(0, 8, (ROWS, LENGTH))  # few distinct ids, so n-grams and repeats occur
SCORES = (RNG.standard_normal((ROWS, VOCAB)) * 3).astype(np.float32)
SCORES[0, :3] = -SCORES[0, :3] - 1  # negative logits on repeated ids (the multiply side of the penalty)

# (our processor, its arguments) -> (HF class, its kwargs)
CASES = [
    (("repetition_penalty", 1.5), ("RepetitionPenaltyLogitsProcessor", {"penalty": 1.5})),
    (("repetition_penalty", 0.6), ("RepetitionPenaltyLogitsProcessor", {"penalty": 0.6})),
    (("no_repeat_ngram", 2), ("NoRepeatNGramLogitsProcessor", {"ngram_size": 2})),
    (("no_repeat_ngram", 3), ("NoRepeatNGramLogitsProcessor", {"ngram_size": 3})),
    (("no_repeat_ngram", 1), ("NoRepeatNGramLogitsProcessor", {"ngram_size": 1})),
    (("min_new_tokens", (3, 5, (4, 9))), ("MinNewTokensLengthLogitsProcessor", {"min_new_tokens": 5,
                                                                                "eos_token_id": [4, 9]})),
    (("temperature", 0.7), ("TemperatureLogitsWarper", {"temperature": 0.7})),
    (("top_k", 1), ("TopKLogitsWarper", {"top_k": 1})),
    (("top_k", 7), ("TopKLogitsWarper", {"top_k": 7})),
    (("top_p", 0.3), ("TopPLogitsWarper", {"top_p": 0.3})),
    (("top_p", 0.9), ("TopPLogitsWarper", {"top_p": 0.9})),
    (("warp", (0.8, 10, 0.85)), None),  # temperature -> top-k -> top-p, as HF chains them
]
WARP_HF = [["TemperatureLogitsWarper", {"temperature": 0.8}], ["TopKLogitsWarper", {"top_k": 10}],
           ["TopPLogitsWarper", {"top_p": 0.85}]]
PROMPT = LENGTH - 3  # min_new_tokens: 3 tokens generated so far


def _numpy_impl(name, arg, scores, ids):
    if name == "repetition_penalty":
        return ref.apply_repetition_penalty(scores, ids, arg)
    if name == "no_repeat_ngram":
        return ref.apply_no_repeat_ngram(scores, ids, arg)
    if name == "min_new_tokens":
        return ref.apply_min_new_tokens(scores, *arg)
    if name == "temperature":
        return ref.apply_temperature(scores, arg)
    if name == "top_k":
        return ref.apply_top_k(scores, arg)
    if name == "top_p":
        return ref.apply_top_p(scores, arg)
    return ref.warp_logits(scores, *arg)


def _torch_impl(name, arg, scores, ids):
    import torch

    from opt_torch import generation as g

    s, i = torch.from_numpy(scores.copy()), torch.from_numpy(ids)
    fns = {"repetition_penalty": lambda: g.apply_repetition_penalty(s, i, arg),
           "no_repeat_ngram": lambda: g.apply_no_repeat_ngram(s, i, arg),
           "min_new_tokens": lambda: g.apply_min_new_tokens(s, *arg),
           "temperature": lambda: g.apply_temperature(s, arg),
           "top_k": lambda: g.apply_top_k(s, arg),
           "top_p": lambda: g.apply_top_p(s, arg),
           "warp": lambda: g.warp_logits(s, *arg)}
    return fns[name]().numpy()


def _tf_impl(name, arg, scores, ids):
    import tensorflow as tf

    from opt_tf import generation as g

    s, i = tf.constant(scores), tf.constant(ids, tf.int32)
    fns = {"repetition_penalty": lambda: g.apply_repetition_penalty(s, i, arg),
           "no_repeat_ngram": lambda: g.apply_no_repeat_ngram(s, i, arg),
           "min_new_tokens": lambda: g.apply_min_new_tokens(s, *arg),
           "temperature": lambda: g.apply_temperature(s, arg),
           "top_k": lambda: g.apply_top_k(s, arg),
           "top_p": lambda: g.apply_top_p(s, tf.constant(arg, tf.float32)),
           "warp": lambda: g.warp_logits(s, arg[0], arg[1], tf.constant(arg[2], tf.float32))}
    return fns[name]().numpy()


def _flax_impl(name, arg, scores, ids):
    import jax.numpy as jnp

    from opt_flax import generation as g

    s, i = jnp.asarray(scores), jnp.asarray(ids, jnp.int32)
    fns = {"repetition_penalty": lambda: g.apply_repetition_penalty(s, i, arg),
           "no_repeat_ngram": lambda: g.apply_no_repeat_ngram(s, i, arg),
           "min_new_tokens": lambda: g.apply_min_new_tokens(s, *arg),
           "temperature": lambda: g.apply_temperature(s, arg),
           "top_k": lambda: g.apply_top_k(s, arg),
           "top_p": lambda: g.apply_top_p(s, arg),
           "warp": lambda: g.warp_logits(s, *arg)}
    return np.asarray(fns[name]())


IMPLS = {"numpy": _numpy_impl, "torch": _torch_impl, "tf": _tf_impl, "flax": _flax_impl}


@pytest.fixture(scope="module")
def hf_scores():
    cases = [{"input_ids": IDS, "scores": SCORES, "prompt_length": PROMPT,
              "processors": WARP_HF if hf is None else [list(hf)]} for _, hf in CASES]
    return oracle_processors(cases)


@pytest.mark.parametrize("impl", ["numpy", *[b for b in ENABLED if b in IMPLS]])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0][0]}-{c[0][1]}" for c in CASES])
def test_processor_equals_hugging_face(impl, index, hf_scores):
    (name, arg), _ = CASES[index]
    got = IMPLS[impl](name, arg, SCORES, IDS)
    expected = hf_scores[index]
    filtered = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(got), filtered, err_msg=f"{impl} {name} {arg}: filtered set")
    np.testing.assert_allclose(got[~filtered], expected[~filtered], rtol=1e-6, err_msg=f"{impl} {name} {arg}")
    if name in ("top_k", "top_p", "no_repeat_ngram", "min_new_tokens", "warp"):
        assert filtered.any(), f"{name} {arg} filters nothing: the case does not test it"
