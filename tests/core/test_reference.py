"""The float64 reference against Hugging Face 4.57.6 (torch) - the spec is itself checked."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core.reference import (
    ReferenceOPTForCausalLM,
    ReferenceOPTForQuestionAnswering,
    ReferenceOPTForSequenceClassification,
    ReferenceOPTModel,
    random_parameters,
)
from tests.golden import hf_golden
from tests.oracle import oracle_checkpoint, oracle_run
from tests.variants import CORE_VARIANTS, TOLERANCE, VARIANTS, left_padded_batch, relative_error, right_padded_batch

pytestmark = pytest.mark.oracle


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_logits_and_hidden_states_match_hf(variant):
    g = hf_golden(variant)
    ref = ReferenceOPTForCausalLM.from_pretrained(g.folder)
    out = ref(g.ids, g.mask)
    assert relative_error(out.logits, g.torch["logits"], g.mask) < TOLERANCE["float32"]
    assert len(out.hidden_states) == len(g.torch["hidden_states"]) == VARIANTS[variant].num_hidden_layers + 1
    for j, hf_h in enumerate(g.torch["hidden_states"]):
        assert relative_error(out.hidden_states[j], hf_h, g.mask) < TOLERANCE["float32"], f"hidden state {j}"
    assert out.hidden_states[-1] is out.last_hidden_state


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_greedy_tokens_match_hf(variant):
    g = hf_golden(variant)
    ref = ReferenceOPTForCausalLM.from_pretrained(g.folder)
    ours = ref.greedy(g.ids, g.mask, max_new_tokens=g.torch["greedy"].shape[1] - g.ids.shape[1])
    hf = g.torch["greedy"]
    # HF stops a row at eos and pads it; compare up to and including each row's first eos.
    for row in range(hf.shape[0]):
        new_hf, new_ours = hf[row, g.ids.shape[1]:], ours[row, g.ids.shape[1]:]
        stop = np.flatnonzero(new_hf == 2)
        n = stop[0] + 1 if stop.size else len(new_hf)
        assert new_ours[:n].tolist() == new_hf[:n].tolist(), row


@pytest.mark.parametrize("head, cls", [("sequence_classification", ReferenceOPTForSequenceClassification),
                                       ("question_answering", ReferenceOPTForQuestionAnswering),
                                       ("base", ReferenceOPTModel)])
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_heads_match_hf(head, cls, variant):
    folder = oracle_checkpoint(VARIANTS[variant], seed=1, head=head, formats=("safetensors",), noise=0.3)
    ids, mask = left_padded_batch()
    rids, rmask = right_padded_batch()
    hf_left, hf_right = oracle_run(folder, [{"framework": "torch", "input_ids": ids, "attention_mask": mask},
                                            {"framework": "torch", "input_ids": rids, "attention_mask": rmask}],
                                   head=head)
    ref = cls.from_pretrained(folder)
    for (i, m), hf in (((ids, mask), hf_left), ((rids, rmask), hf_right)):
        out = ref(i, m)
        if head == "sequence_classification":
            assert out.logits.shape == (3, 2)
            assert relative_error(out.logits, hf["logits"]) < TOLERANCE["float32"]
        elif head == "question_answering":
            assert relative_error(out.start_logits, hf["start_logits"], m) < TOLERANCE["float32"]
            assert relative_error(out.end_logits, hf["end_logits"], m) < TOLERANCE["float32"]
        else:
            assert relative_error(out.last_hidden_state, hf["last_hidden_state"], m) < TOLERANCE["float32"]


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_bias"])
def test_cached_decoding_equals_full_pass(variant):
    cfg = VARIANTS[variant]
    ref = ReferenceOPTForCausalLM(cfg, random_parameters(cfg, seed=3, std=0.3))
    ids, mask = left_padded_batch()
    full = ref(ids, mask).logits
    split = 4
    out = ref(ids[:, :split], mask[:, :split])
    logits = [out.logits]
    for t in range(split, ids.shape[1]):  # then one token at a time through the cache
        out = ref(ids[:, t:t + 1], mask[:, :t + 1], past_key_values=out.past_key_values)
        logits.append(out.logits)
    stepped = np.concatenate(logits, axis=1)
    assert relative_error(stepped, full, mask) < 1e-12  # same float64 math, only regrouped


def test_fully_masked_rows_stay_finite():
    cfg = VARIANTS["pre_ln"]
    ref = ReferenceOPTForCausalLM(cfg, random_parameters(cfg))
    ids = np.array([[1, 1, 1, 2, 5]])
    out = ref(ids, (ids != 1).astype(int))
    assert np.isfinite(out.logits).all()
