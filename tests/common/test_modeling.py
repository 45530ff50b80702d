"""The model tests every backend passes, written once over the `backend` fixture (tests/backends.py):
every variant and head against the float64 reference (left and right padding), hidden states,
padding-only rows, the heads' losses against `opt_core.losses`, tied weights and input errors.
What one backend alone has (SDPA/eager/flash and half precision in torch, tf.function and Keras
in TF, bfloat16 params and remat in Flax) stays in tests/<backend>/."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import losses as reference_losses
from opt_core.params import Head, parameter_count
from opt_core.reference import (
    ReferenceOPTForCausalLM,
    ReferenceOPTForQuestionAnswering,
    ReferenceOPTForSequenceClassification,
    ReferenceOPTModel,
    random_parameters,
)
from opt_verify.tolerances import LOSS
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error, right_padded_batch

REFERENCE = {
    Head.BASE: ReferenceOPTModel,
    Head.CAUSAL_LM: ReferenceOPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: ReferenceOPTForSequenceClassification,
    Head.QUESTION_ANSWERING: ReferenceOPTForQuestionAnswering,
}
OUTPUTS = {
    Head.BASE: ("last_hidden_state",),
    Head.CAUSAL_LM: ("logits",),
    Head.SEQUENCE_CLASSIFICATION: ("logits",),
    Head.QUESTION_ANSWERING: ("start_logits", "end_logits"),
}
F32 = TOLERANCE["float32"]


def _model(backend, variant: str, head: Head, **changes):
    config = VARIANTS[variant].replace(**changes) if changes else VARIANTS[variant]
    params = random_parameters(config, head, std=0.5)
    return backend.build(config, head, params), REFERENCE[head](config, params), config


# ---------------------------------------------------------------- against the float64 reference
@pytest.mark.parametrize("head", list(Head), ids=lambda h: h.value)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_float64_reference(backend, variant, head):
    model, ref, config = _model(backend, variant, head, num_labels=3)
    for ids, mask in (left_padded_batch(config.vocab_size), right_padded_batch(config.vocab_size)):
        out, want = backend.forward(model, ids, attention_mask=mask), ref(ids, mask)
        real = None if head is Head.SEQUENCE_CLASSIFICATION else mask  # pooled logits: one per row
        for field in OUTPUTS[head]:
            assert np.isfinite(out[field]).all(), field
            assert relative_error(out[field], getattr(want, field), real) < F32, field


def test_untied_lm_head_matches_reference(backend):
    model, ref, config = _model(backend, "pre_ln_proj", Head.CAUSAL_LM, tie_word_embeddings=False)
    assert not np.array_equal(ref.params["lm_head.weight"], ref.params["decoder.embed_tokens.weight"])
    ids, mask = left_padded_batch(config.vocab_size)
    assert relative_error(backend.forward(model, ids, attention_mask=mask)["logits"], ref(ids, mask).logits, mask) < F32


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_no_attention_mask_means_every_token_is_real(backend, variant):
    model, ref, config = _model(backend, variant, Head.CAUSAL_LM)
    ids = left_padded_batch(config.vocab_size)[0][:1, :5]
    assert relative_error(backend.forward(model, ids)["logits"], ref(ids).logits) < F32


def test_hidden_states_follow_hugging_face(backend):
    model, ref, config = _model(backend, "post_ln_proj", Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    out, want = backend.forward(model, ids, attention_mask=mask, output_hidden_states=True), ref(ids, mask)
    # Inputs of every layer (embeddings first), then the final output (after project_out).
    assert len(out["hidden_states"]) == config.num_hidden_layers + 1
    for got, expected in zip(out["hidden_states"][:-1], want.hidden_states[:-1]):
        assert relative_error(got, expected, mask) < F32
    assert relative_error(out["hidden_states"][-1], want.last_hidden_state, mask) < F32


def test_rows_of_padding_only_stay_finite(backend):
    model, _, config = _model(backend, "post_ln_proj", Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    ids = np.concatenate([ids, np.ones((1, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.zeros((1, mask.shape[1]), mask.dtype)])  # a row of padding only
    out = backend.forward(model, ids, attention_mask=mask, output_hidden_states=True)
    assert np.isfinite(out["logits"]).all()
    assert all(np.isfinite(h).all() for h in out["hidden_states"])


# ---------------------------------------------------------------- the heads' losses
def test_causal_lm_loss_is_shifted_cross_entropy(backend):
    model, ref, config = _model(backend, "pre_ln", Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    # Only targets predicted from real tokens: outputs at padding are implementation-defined.
    from_real = np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
    labels = np.where(from_real == 1, ids, -100)
    out = backend.forward(model, ids, attention_mask=mask, labels=labels)
    want = reference_losses.causal_lm_loss(ref(ids, mask).logits, labels)
    assert abs(float(out["loss"]) - want) < LOSS.nats * max(1.0, want)


CLASSIFICATION = {
    "regression": ("regression", 1, np.array([0.5, -1.0, 2.0], np.float32)),
    "regression_2_labels": ("regression", 2, np.array([[0.5, -1.0], [1.0, 2.0], [0.0, 0.0]], np.float32)),
    "single_label": ("single_label_classification", 3, np.array([0, 2, 1])),
    "multi_label": ("multi_label_classification", 3, np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], np.float32)),
}


@pytest.mark.parametrize("case", list(CLASSIFICATION))
def test_sequence_classification_loss_by_problem_type(backend, case):
    problem, num_labels, labels = CLASSIFICATION[case]
    ids, mask = left_padded_batch()
    for problem_type in (problem, None):  # explicit, then inferred like Hugging Face
        if problem_type is None and case == "regression_2_labels":
            continue  # two float labels infer multi-label, not regression
        model, ref, config = _model(backend, "pre_ln", Head.SEQUENCE_CLASSIFICATION, num_labels=num_labels,
                                    problem_type=problem_type)
        out = backend.forward(model, ids, attention_mask=mask, labels=labels)
        want = reference_losses.sequence_classification_loss(ref(ids, mask).logits, labels, config)
        assert reference_losses.problem_type(config, labels.dtype.name) == problem
        assert abs(float(out["loss"]) - want) < LOSS.nats * max(1.0, want), problem_type


def test_question_answering_loss_clamps_positions(backend):
    model, _, config = _model(backend, "pre_ln", Head.QUESTION_ANSWERING)
    ids, mask = left_padded_batch(config.vocab_size)
    start, end = np.array([1, 3, 100]), np.array([-2, 100, 4])  # 100 clamps to T (ignored), -2 to 0
    out = backend.forward(model, ids, attention_mask=mask, start_positions=start, end_positions=end)
    # On the model's own logits: the softmax runs over padding positions too, whose logits are
    # implementation-defined (the logits at real tokens are checked against the reference above).
    expected = reference_losses.question_answering_loss(out["start_logits"], out["end_logits"], start, end)
    assert abs(float(out["loss"]) - expected) < LOSS.nats * max(1.0, expected)


# ---------------------------------------------------------------- weights and inputs
def test_tied_lm_head_and_parameter_count(backend):
    config = VARIANTS["pre_ln_proj"]
    model = backend.build(config, Head.CAUSAL_LM)
    params = backend.params(model)
    assert "lm_head.weight" not in params  # tied: the token embedding is the head
    assert params["decoder.embed_tokens.weight"].shape == (config.vocab_size, config.embed_dim)
    assert (params["decoder.embed_tokens.weight"][config.pad_token_id] == 0).all()  # HF zeroes the pad row
    assert model.num_parameters() == parameter_count(config)
    untied = backend.params(backend.build(config.replace(tie_word_embeddings=False), Head.CAUSAL_LM))
    assert untied["lm_head.weight"].shape == (config.vocab_size, config.embed_dim)


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (np.array([[2, 5, 500]]), None, "outside the vocabulary"),
        (np.array([[2, 5, -1]]), None, "outside the vocabulary"),
        (np.full((1, 65), 5), None, "max_position_embeddings"),
        (np.array([2, 5, 6]), None, "2-D"),
        (np.array([[2, 5, 6]]), np.array([[1, 1]]), "attention_mask has shape"),
        (np.array([[2, 5, 6]]), np.array([[1, 2, 1]]), "only 0 and 1"),
        (np.array([[2.0, 5.0]]), None, "integers"),
    ],
)
def test_bad_inputs_give_clear_errors(backend, ids, mask, message):
    model = backend.build(VARIANTS["pre_ln"], Head.CAUSAL_LM)
    with pytest.raises(ValueError, match=message):
        backend.forward(model, ids, attention_mask=mask)


def test_config_must_be_an_opt_config(backend):
    with pytest.raises(TypeError, match="OPTConfig"):
        backend.model_class(Head.BASE)({"hidden_size": 4})
