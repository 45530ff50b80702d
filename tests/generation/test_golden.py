"""Every backend's greedy / beam / penalty tokens equal Hugging Face 4.57.6's on golden cases that
exercise each option (eos at different steps per row, beams that diverge and finish early, length
penalty and early_stopping that matter, penalties that change the text), in float32, float16 and
bfloat16."""

from __future__ import annotations

import numpy as np
import pytest

from tests.generation.golden import (
    CASES,
    HALF_CASES,
    HALF_DTYPES,
    check_cases_bite,
    golden_batch,
    golden_folder,
    hf_sequences,
    run_case,
)

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def golden_model():
    models = {}

    def get(backend, dtype=None):
        key = (backend.name, dtype)
        if key not in models:
            models[key] = backend.load(golden_folder(), dtype=dtype)
        return models[key]

    return get


def test_golden_cases_exercise_their_options():
    check_cases_bite(hf_sequences())


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_equal_hugging_face(backend, golden_model, case):
    got = run_case(golden_model(backend), CASES[case], backend.to_numpy)
    expected = hf_sequences()[case]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected, err_msg=f"{backend.name} {case}: {CASES[case]}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_tokens_equal_hugging_face(backend, golden_model, dtype):
    """Hugging Face in the same dtype (its eager attention, fp32 softmax) gives the same tokens."""
    ids, mask = golden_batch()
    model = golden_model(backend, dtype)
    for name, kw in HALF_CASES.items():
        got = backend.to_numpy(model.generate(ids, attention_mask=mask, do_sample=False, **kw))
        np.testing.assert_array_equal(got, hf_sequences()[f"{dtype}/{name}"], err_msg=f"{backend.name} {dtype} {name}")
