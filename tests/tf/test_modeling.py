"""What only the TensorFlow models have: the static cache, Hugging Face's TF checkpoints and golden runs,
tf.function, the Keras backend check. The tests every backend passes are tests/common/."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from opt_tf import OPTForCausalLM, OPTForSequenceClassification, init_cache
from tests.golden import hf_golden
from tests.tf.helpers import config, random_model
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.tf



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
