"""The `backend` fixture: each generation contract / golden test runs once per enabled backend."""

from __future__ import annotations

import pytest

from tests.generation.backends import ENABLED, get_backend


@pytest.fixture(scope="session", params=[pytest.param(n, marks=getattr(pytest.mark, n)) for n in ENABLED])
def backend(request):
    return get_backend(request.param)
