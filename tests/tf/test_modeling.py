"""The TensorFlow models against the float64 reference and Hugging Face's golden runs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from opt_core.params import Head
from opt_core.reference import (
    ReferenceOPTForCausalLM,
    ReferenceOPTForQuestionAnswering,
    ReferenceOPTForSequenceClassification,
    ReferenceOPTModel,
)
from opt_tf import (
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
    init_cache,
)
from tests.golden import hf_golden
from tests.tf.helpers import config, random_model
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error, right_padded_batch

pytestmark = pytest.mark.tf

PAIRS = {
    Head.BASE: (OPTModel, ReferenceOPTModel),
    Head.CAUSAL_LM: (OPTForCausalLM, ReferenceOPTForCausalLM),
    Head.SEQUENCE_CLASSIFICATION: (OPTForSequenceClassification, ReferenceOPTForSequenceClassification),
    Head.QUESTION_ANSWERING: (OPTForQuestionAnswering, ReferenceOPTForQuestionAnswering),
}


def _compare(head, tf_out, ref_out, mask):
    tol = TOLERANCE["float32"]
    if head is Head.BASE:
        assert relative_error(tf_out.last_hidden_state.numpy(), ref_out.last_hidden_state, mask) < tol
    elif head is Head.CAUSAL_LM:
        assert relative_error(tf_out.logits.numpy(), ref_out.logits, mask) < tol
    elif head is Head.SEQUENCE_CLASSIFICATION:
        assert relative_error(tf_out.logits.numpy(), ref_out.logits) < tol
    else:
        assert relative_error(tf_out.start_logits.numpy(), ref_out.start_logits, mask) < tol
        assert relative_error(tf_out.end_logits.numpy(), ref_out.end_logits, mask) < tol


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head", list(PAIRS), ids=lambda h: h.value)
def test_matches_float64_reference(variant, head):
    cls, ref_cls = PAIRS[head]
    cfg = config(variant, num_labels=3)
    model, params = random_model(cls, cfg)
    ref = ref_cls(cfg, params)
    for ids, mask in (left_padded_batch(cfg.vocab_size), right_padded_batch(cfg.vocab_size)):
        out = model(ids, attention_mask=mask)
        _compare(head, out, ref(ids, mask), mask)
        assert all(np.isfinite(v.numpy()).all() for k in out.keys() if k != "hidden_states" for v in [out[k]])


def test_untied_lm_head_matches_reference():
    cfg = config("pre_ln_proj", tie_word_embeddings=False)
    model, params = random_model(OPTForCausalLM, cfg)
    assert not np.array_equal(params["lm_head.weight"], params["decoder.embed_tokens.weight"])
    ids, mask = left_padded_batch(cfg.vocab_size)
    ref = ReferenceOPTForCausalLM(cfg, params)(ids, mask).logits
    assert relative_error(model(ids, attention_mask=mask).logits.numpy(), ref, mask) < TOLERANCE["float32"]


def test_all_masked_rows_stay_finite():
    model, _ = random_model(OPTForCausalLM, config("post_ln_proj"))
    ids = np.array([[1, 1, 1, 1], [1, 1, 2, 5]])
    mask = np.array([[0, 0, 0, 0], [0, 0, 1, 1]])
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert np.isfinite(out.logits.numpy()).all()
    assert all(np.isfinite(h.numpy()).all() for h in out.hidden_states)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_cached_decoding_equals_full_pass(variant):
    cfg = config(variant)
    model, _ = random_model(OPTForCausalLM, cfg)
    ids, mask = left_padded_batch(cfg.vocab_size)
    full = model(ids, attention_mask=mask).logits.numpy()
    cache = init_cache(cfg, ids.shape[0], ids.shape[1] + 2)
    split = 5
    out = model(ids[:, :split], attention_mask=mask[:, :split], past_key_values=cache)
    parts = [out.logits.numpy()]
    cache = out.past_key_values
    for j in range(split, ids.shape[1]):  # one token at a time
        out = model(ids[:, j : j + 1], attention_mask=mask[:, : j + 1], past_key_values=cache)
        cache = out.past_key_values
        parts.append(out.logits.numpy())
    assert cache.get_seq_length() == ids.shape[1]
    assert relative_error(np.concatenate(parts, axis=1), full, mask) < TOLERANCE["float32"]
    with pytest.raises(ValueError, match="do not fit the StaticCache"):
        model(ids[:, :3], attention_mask=np.ones((3, 12), np.int64), past_key_values=cache)


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fmt", ["safetensors", "tf-h5", "flax-msgpack"])
def test_hf_checkpoints_load_and_match_hf(variant, fmt):
    g = hf_golden(variant)
    model = OPTForCausalLM.from_pretrained(g.folder, format=fmt)
    out = model(g.ids, attention_mask=g.mask, output_hidden_states=True)
    tol = TOLERANCE["float32"]
    assert relative_error(out.logits.numpy(), g.tf["logits"], g.mask) < tol
    assert relative_error(out.logits.numpy(), g.torch["logits"], g.mask) < tol
    assert len(out.hidden_states) == len(g.torch["hidden_states"])
    for j, (ours, hf) in enumerate(zip(out.hidden_states, g.torch["hidden_states"])):
        assert relative_error(ours.numpy(), hf, g.mask) < tol, f"hidden state {j}"


def test_bad_inputs_have_clear_errors():
    model, _ = random_model(OPTModel, config("pre_ln"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(np.array([[2, 500]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.full((1, 65), 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(np.array([[2, 5]]), attention_mask=np.ones((1, 3)))
    with pytest.raises(TypeError, match="OPTConfig"):
        OPTModel({"hidden_size": 4})


def test_numpy_and_tensor_inputs_agree_and_fit_in_tf_function():
    model, _ = random_model(OPTForSequenceClassification, config("pre_ln"))
    ids, mask = left_padded_batch(128)
    eager = model(ids, attention_mask=mask).logits.numpy()
    fn = tf.function(lambda i, m: model(i, attention_mask=m).logits)
    graph = fn(tf.constant(ids), tf.constant(mask)).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-6)


def test_keras_backend_other_than_tensorflow_is_a_clear_error():
    env = dict(os.environ, KERAS_BACKEND="numpy")
    proc = subprocess.run([sys.executable, "-c", "import opt_tf"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode != 0
    assert "KERAS_BACKEND=tensorflow" in proc.stderr
