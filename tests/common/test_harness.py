"""The backend adapters themselves (tests/backends.py): build from canonical weights, read them
back, forward, save/load and one training step mean the same thing in every backend."""

from __future__ import annotations

import numpy as np

from opt_core import losses as reference_losses
from opt_core.params import Head, parameter_table
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error


def test_params_round_trip_bit_for_bit(backend):
    config = VARIANTS["post_ln_proj"]
    params = random_parameters(config, Head.QUESTION_ANSWERING, std=0.5)
    got = backend.params(backend.build(config, Head.QUESTION_ANSWERING, params))
    assert list(got) == [s.name for s in parameter_table(config, Head.QUESTION_ANSWERING)]
    for name, value in got.items():
        assert np.array_equal(value, params[name]), name


def test_save_load_forward_and_train_step(backend, tmp_path):
    config = VARIANTS["pre_ln"]
    params = random_parameters(config, Head.CAUSAL_LM, std=0.5)
    ids, mask = left_padded_batch(config.vocab_size)
    model = backend.build(config, Head.CAUSAL_LM, params)
    labels = np.where(mask == 1, ids, -100)
    out = backend.forward(model, ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    ref = ReferenceOPTForCausalLM(config, params)(ids, mask)
    assert relative_error(out["logits"], ref.logits, mask) < TOLERANCE["float32"]
    assert len(out["hidden_states"]) == config.num_hidden_layers + 1
    assert abs(float(out["loss"]) - reference_losses.causal_lm_loss(out["logits"], labels)) < 1e-5

    backend.save(model, tmp_path)
    again = backend.forward(backend.load(Head.CAUSAL_LM, tmp_path), ids, attention_mask=mask)
    assert np.array_equal(again["logits"], out["logits"])

    first = backend.train_step(model, {"input_ids": ids, "attention_mask": mask}, learning_rate=0.05)
    assert abs(first - float(out["loss"])) < 1e-6
    second = backend.forward(model, ids, attention_mask=mask, labels=labels)["loss"]
    assert float(second) < first
