"""The `backend` fixture: each generation contract / golden test runs once per enabled backend."""

from __future__ import annotations

import pytest

from tests.generation.backends import ENABLED, get_backend
from tests.generation.golden import golden_folder


@pytest.fixture(scope="session", params=[pytest.param(n, marks=getattr(pytest.mark, n)) for n in ENABLED])
def backend(request):
    return get_backend(request.param)


@pytest.fixture(scope="module")
def golden_model():
    """backend -> the golden checkpoint loaded in it, once per test module."""
    models = {}

    def get(backend):
        if backend.name not in models:
            models[backend.name] = backend.load(golden_folder())
        return models[backend.name]

    return get


# The XLA backends compile one decode loop per golden case (tens of seconds each on 2 shared
# cores), so the default suite runs a subset that still covers every option; `-m slow` runs the rest.
XLA_FAST_CASES = {"greedy_eos_list", "beam_lp_neg", "beam_es_true", "rep_1_5", "min_new", "no_repeat_2"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") not in ("tf", "flax"):
            continue
        name = item.originalname
        if (name == "test_tokens_equal_hugging_face" and params.get("case") not in XLA_FAST_CASES) or (
            name == "test_half_precision_tokens_equal_hugging_face"
        ) or (name == "test_the_same_seed_samples_the_reference_tokens" and params.get("kw", {}).get("top_k") in (0, 5)
              and params.get("kw", {}).get("top_p") is None):
            item.add_marker(pytest.mark.slow)
