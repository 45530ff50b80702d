"""Contrastive search (`penalty_alpha`, `top_k`): the NumPy reference (opt_core.generation) equals
Hugging Face 4.55.4 (the last release shipping it in the library; `.venv-oracle-455`), and every
backend equals the reference, with pad_token_id 0, 1 and None, several eos ids, rows finishing at
different steps and left padding (the golden model and batch of tests/generation/golden.py).
The pad variants share each case's compiled functions in TF and Flax."""

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

PADS = (0, 1, None)  # None: the generation config has no pad id either, so eos[0] pads (HF's fallback)
CASES: dict[str, dict[str, Any]] = {
    "three_eos": {"max_new_tokens": 16, "penalty_alpha": 0.6, "top_k": 4, "eos_token_id": [EOS, *EOS_LIST]},
    "one_eos_penalised": {"max_new_tokens": 16, "penalty_alpha": 0.9, "top_k": 5, "eos_token_id": EOS_LIST[0],
                          "repetition_penalty": 1.3},
}
RUNS = [(case, pad) for case in CASES for pad in PADS]


def _config(pad: int | None) -> GenerationConfig:
    return dataclasses.replace(GenerationConfig.from_pretrained(golden_folder()), pad_token_id=pad)


def _kwargs(case: str, pad: int | None) -> dict[str, Any]:
    return {**CASES[case], "pad_token_id": pad, "do_sample": False}


@functools.cache
def hf_contrastive() -> dict[tuple[str, int | None], np.ndarray]:
    """Hugging Face 4.55.4's sequences for every (case, pad) (one cached oracle call)."""
    ids, mask = golden_batch()
    runs = [{"framework": "torch", "input_ids": ids, "attention_mask": mask, "generate": _kwargs(case, pad),
             "generation_config": {"pad_token_id": pad}} for case, pad in RUNS]
    res = oracle_run(golden_folder(), runs, oracle="4.55")
    return {run: r["sequences"].astype(np.int64) for run, r in zip(RUNS, res)}


@functools.cache
def reference_contrastive() -> dict[tuple[str, int | None], np.ndarray]:
    ref = ReferenceOPTForCausalLM.from_pretrained(golden_folder())
    ids, mask = golden_batch()
    return {(case, pad): reference_generate(ref, ids, mask, generation_config=_config(pad), **_kwargs(case, pad))
            for case, pad in RUNS}


def test_cases_exercise_what_they_claim():
    """On Hugging Face's output: rows end at different steps (so some are padded, with 0 or 1 as
    asked), and contrastive search differs from greedy decoding."""
    hf = hf_contrastive()
    prompt = golden_batch()[0].shape[1]
    for case in CASES:
        eos = np.atleast_1d(CASES[case]["eos_token_id"])
        out = hf[(case, 1)][:, prompt:]
        ends = {int(np.flatnonzero(np.isin(row, eos))[0]) for row in out if np.isin(row, eos).any()}
        assert len(ends) > 1, f"{case}: rows should end at different steps"
        assert (hf[(case, 0)][:, prompt:] == 0).any() and (out == 1).any(), f"{case}: no row was padded"
    ref = ReferenceOPTForCausalLM.from_pretrained(golden_folder())
    ids, mask = golden_batch()
    kw = {k: v for k, v in _kwargs("three_eos", 1).items() if k != "penalty_alpha"}
    greedy = reference_generate(ref, ids, mask, generation_config=_config(1), **kw)
    n = min(greedy.shape[1], hf[("three_eos", 1)].shape[1])
    assert not np.array_equal(greedy[:, :n], hf[("three_eos", 1)][:, :n]), "contrastive search equals greedy"


@pytest.mark.parametrize("case,pad", RUNS)
def test_reference_equals_hugging_face_4_55(case, pad):
    np.testing.assert_array_equal(reference_contrastive()[(case, pad)], hf_contrastive()[(case, pad)],
                                  err_msg=f"{case} pad={pad}")


@pytest.mark.parametrize("case,pad", RUNS)
def test_backend_equals_reference(backend, golden_model, case, pad):
    got = generate_with_config(backend, golden_model(backend), _config(pad), **_kwargs(case, pad))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, reference_contrastive()[(case, pad)], err_msg=f"{backend.name} {case} pad={pad}")


def test_bad_penalty_alpha_is_refused_by_name(backend, golden_model):
    ids, mask = golden_batch()
    with pytest.raises(ValueError, match="penalty_alpha"):
        golden_model(backend).generate(ids, attention_mask=mask, penalty_alpha=2.0, top_k=4)
