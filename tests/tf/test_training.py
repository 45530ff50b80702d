"""Keras training: compile + fit on tf.data for the causal LM and sequence classification."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from opt_core.reference import ReferenceOPTForCausalLM
from opt_tf import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
from tests.tf.helpers import config, random_model
from tests.variants import left_padded_batch, relative_error

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


def test_causal_lm_loss_is_shifted_cross_entropy():
    cfg = config("pre_ln")
    model, params = random_model(OPTForCausalLM, cfg)
    ids, mask = left_padded_batch(cfg.vocab_size)
    # Only targets predicted from real tokens: outputs at padding are implementation-defined.
    predicted_from_real = np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
    labels = np.where(predicted_from_real == 1, ids, -100)
    loss = float(model(ids, attention_mask=mask, labels=labels).loss)
    logits = ReferenceOPTForCausalLM(cfg, params)(ids, mask).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, np.where(keep, target, 0)[..., None], -1)[..., 0][keep].mean()
    assert relative_error(np.array([loss]), np.array([want])) < 1e-5


def test_fit_reduces_sequence_classification_loss():
    cfg = config("post_ln_proj", num_labels=3, dropout=0.0)
    model, _ = random_model(OPTForSequenceClassification, cfg, std=0.02)
    ids, mask = left_padded_batch(cfg.vocab_size)
    ds = tf.data.Dataset.from_tensor_slices(({"input_ids": ids, "attention_mask": mask}, np.array([0, 2, 1]))).batch(3)
    before, after, _ = _loss_after_fit(model, ds)
    assert after < 0.7 * before


@pytest.mark.parametrize("problem,labels", [
    ("regression", np.array([[0.5, -1.0], [1.0, 2.0], [0.0, 0.0]], np.float32)),
    ("multi_label_classification", np.array([[1, 0], [0, 1], [1, 1]], np.float32)),
])
def test_classification_problem_types(problem, labels):
    cfg = config("pre_ln", num_labels=2, problem_type=problem)
    model, _ = random_model(OPTForSequenceClassification, cfg)
    ids, mask = left_padded_batch(cfg.vocab_size)
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits.numpy().astype(np.float64)
    if problem == "regression":
        want = np.mean((logits - labels) ** 2)
    else:
        want = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    assert abs(float(out.loss) - want) < 1e-5 * max(1.0, abs(want))


def test_qa_loss_clamps_and_ignores_out_of_range_positions():
    cfg = config("pre_ln", dropout=0.0)
    model, _ = random_model(OPTForQuestionAnswering, cfg, std=0.02)
    ids, mask = left_padded_batch(cfg.vocab_size)
    y = {"start_positions": np.array([3, 5, 4]), "end_positions": np.array([6, 8, 20])}  # 20 clamps -> ignored
    out = model(ids, attention_mask=mask, **y)
    start, end = out.start_logits.numpy().astype(np.float64), out.end_logits.numpy().astype(np.float64)

    def ce(logits, pos):
        keep = pos < logits.shape[1]
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        return (lse - logits[np.arange(len(pos)), np.minimum(pos, logits.shape[1] - 1)])[keep].mean()

    want = (ce(start, y["start_positions"]) + ce(end, y["end_positions"])) / 2
    assert abs(float(out.loss) - want) < 1e-5 * max(1.0, want)


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
