"""Beam search: the NumPy reference (opt_core.generation) equals Hugging Face 4.57.6, and every
backend equals the reference, with pad_token_id 0, 1 and None, several eos ids, rows finishing at
different steps, left padding, each early_stopping mode and num_return_sequences.

The model and batch are the golden ones (tests/generation/golden.py): a tiny random OPT whose rows
reach the eos ids at different steps. The cases keep the compiled functions' static settings
(beam count, eos count, early_stopping, num_return_sequences, max_new_tokens) shared between the pad
variants, so TF and Flax compile each setting once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import pytest

from opt_core.generation import reference_generate
from opt_core.generation_config import GenerationConfig
from opt_core.reference import ReferenceOPTForCausalLM
from tests.generation.golden import EOS, EOS_LIST, generate_with_config, golden_batch, golden_folder
from tests.oracle import oracle_run

pytestmark = pytest.mark.oracle

EOS_3 = [EOS, *EOS_LIST]  # three eos ids: rows end at different steps on different ids
PADS = (0, 1, None)  # None: the generation config has no pad id either, so eos[0] pads (HF's fallback)
CASES: dict[str, dict[str, Any]] = {
    "three_eos_all_beams": {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": EOS_3, "num_return_sequences": 3},
    "es_true_two_of_three": {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": EOS_3, "num_return_sequences": 2,
                             "early_stopping": True, "length_penalty": 0.5},
    "never_lp_2": {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": EOS_3, "num_return_sequences": 1,
                   "early_stopping": "never", "length_penalty": 2.0},
}
RUNS = [(case, pad) for case in CASES for pad in PADS]


def _config(pad: int | None) -> GenerationConfig:
    return dataclasses.replace(GenerationConfig.from_pretrained(golden_folder()), pad_token_id=pad)


def _kwargs(case: str, pad: int | None) -> dict[str, Any]:
    return {**CASES[case], "pad_token_id": pad, "do_sample": False}


@functools.cache
def hf_beams() -> dict[tuple[str, int | None], np.ndarray]:
    """Hugging Face's sequences for every (case, pad) (one cached oracle call)."""
    ids, mask = golden_batch()
    runs = [{"framework": "torch", "input_ids": ids, "attention_mask": mask, "generate": _kwargs(case, pad),
             "generation_config": {"pad_token_id": pad}} for case, pad in RUNS]
    return {run: res["sequences"].astype(np.int64) for run, res in zip(RUNS, oracle_run(golden_folder(), runs))}


@functools.cache
def reference_beams() -> dict[tuple[str, int | None], np.ndarray]:
    ref = ReferenceOPTForCausalLM.from_pretrained(golden_folder())
    ids, mask = golden_batch()
    return {(case, pad): reference_generate(ref, ids, mask, generation_config=_config(pad), **_kwargs(case, pad))
            for case, pad in RUNS}


def test_cases_exercise_what_they_claim():
    """On Hugging Face's own output: hypotheses end at different lengths (so some are padded), the
    fill differs between pad 0 (HF writes eos[0]) and pad 1, pad None fills with eos[0], and each
    early_stopping mode changes the result."""
    hf = hf_beams()
    prompt = golden_batch()[0].shape[1]
    out = hf[("three_eos_all_beams", 1)]
    assert out.shape[0] == 3 * 3
    ends = [int(np.flatnonzero(np.isin(row, EOS_3))[0]) if np.isin(row, EOS_3).any() else None
            for row in out[:, prompt:]]
    assert len({e for e in ends if e is not None}) > 2, f"hypotheses should end at different steps: {ends}"
    assert (out[:, prompt:] == 1).any(), "no hypothesis was padded"
    filled = hf[("three_eos_all_beams", 0)]
    assert not (filled[:, prompt:] == 0).any() and (filled != out).any(), "pad 0 should fill with eos[0], as HF"
    assert np.array_equal(filled, hf[("three_eos_all_beams", None)]), "pad None and pad 0 both fill with eos[0]"
    n = min(hf[(c, 1)].shape[1] for c in CASES)
    firsts = {c: hf[(c, 1)][:: CASES[c]["num_return_sequences"], :n].tobytes() for c in CASES}
    assert len(set(firsts.values())) == len(CASES), "the early_stopping / length_penalty cases give the same beams"


@pytest.mark.parametrize("case,pad", RUNS)
def test_reference_equals_hugging_face(case, pad):
    np.testing.assert_array_equal(reference_beams()[(case, pad)], hf_beams()[(case, pad)], err_msg=f"{case} pad={pad}")


@pytest.mark.parametrize("case,pad", RUNS)
def test_backend_equals_reference(backend, golden_model, case, pad):
    got = generate_with_config(backend, golden_model(backend), _config(pad), **_kwargs(case, pad))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, reference_beams()[(case, pad)], err_msg=f"{backend.name} {case} pad={pad}")


@pytest.mark.torch
def test_torch_runs_the_prompt_once():
    """The prompt goes through the model once (B rows), not once per beam; every later call is one
    token per beam."""
    from tests.generation.backends import get_backend

    model = get_backend("torch").load(golden_folder())
    ids, mask = golden_batch()
    shapes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True,
    )
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, eos_token_id=[])
    finally:
        hook.remove()
    assert shapes[0] == ids.shape and shapes[1:] == [(3 * ids.shape[0], 1)] * (len(shapes) - 1), shapes
