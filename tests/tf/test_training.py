"""Keras training: compile + fit on tf.data for the causal LM and sequence classification."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from opt_tf import OPTForCausalLM, OPTForSequenceClassification
from tests.tf.helpers import config, random_model
from tests.variants import left_padded_batch

pytestmark = pytest.mark.tf


def _loss_after_fit(model, dataset, epochs=8):
    """(loss of the first epoch, of the last, all): one batch per epoch, so epoch 1 is the start."""
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    losses = model.fit(dataset, epochs=epochs, verbose=0).history["loss"]
    return losses[0], losses[-1], losses


def test_fit_reduces_causal_lm_loss():
    cfg = config("pre_ln", dropout=0.0)
    model, _ = random_model(OPTForCausalLM, cfg, std=0.02)
    ids, mask = left_padded_batch(cfg.vocab_size)
    labels = np.where(mask == 1, ids, -100)
    ds = tf.data.Dataset.from_tensor_slices({"input_ids": ids, "attention_mask": mask, "labels": labels}).batch(3)
    before, after, losses = _loss_after_fit(model, ds)
    assert after < 0.7 * before and losses[-1] < losses[0], (before, after, losses)


def test_fit_reduces_sequence_classification_loss():
    cfg = config("post_ln_proj", num_labels=3, dropout=0.0)
    model, _ = random_model(OPTForSequenceClassification, cfg, std=0.02)
    ids, mask = left_padded_batch(cfg.vocab_size)
    ds = tf.data.Dataset.from_tensor_slices(({"input_ids": ids, "attention_mask": mask}, np.array([0, 2, 1]))).batch(3)
    before, after, _ = _loss_after_fit(model, ds)
    assert after < 0.7 * before


def test_dropout_only_in_training():
    cfg = config("pre_ln", dropout=0.5, attention_dropout=0.3)
    model, _ = random_model(OPTForCausalLM, cfg)
    ids, mask = left_padded_batch(cfg.vocab_size)
    a = model(ids, attention_mask=mask).logits.numpy()
    b = model(ids, attention_mask=mask, training=False).logits.numpy()
    np.testing.assert_array_equal(a, b)
    c = model(ids, attention_mask=mask, training=True).logits.numpy()
    assert not np.allclose(a, c)


def test_compile_rejects_a_keras_loss():
    model, _ = random_model(OPTForCausalLM, config("pre_ln"))
    with pytest.raises(ValueError, match="own loss"):
        model.compile(optimizer="adam", loss="mse")


def test_layerdrop_only_in_training():
    cfg = config("pre_ln", dropout=0.0, layerdrop=0.5)
    model, _ = random_model(OPTForCausalLM, cfg)
    ids, mask = left_padded_batch(cfg.vocab_size)
    a = model(ids, attention_mask=mask).logits.numpy()
    np.testing.assert_array_equal(a, model(ids, attention_mask=mask).logits.numpy())
    tf.random.set_seed(0)
    runs = [model(ids, attention_mask=mask, training=True).logits.numpy() for _ in range(6)]
    assert all(np.isfinite(r).all() for r in runs)
    assert any(not np.allclose(r, a) for r in runs)  # some layers were skipped
