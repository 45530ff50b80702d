"""A pytest plugin: the `opt_equivalence` fixture and the `--opt-verify-model` option.

Enable it in your `conftest.py`:

    pytest_plugins = ["opt_verify.pytest_plugin"]

then either call the fixture on your checkpoint,

    def test_equivalent(opt_equivalence):
        opt_equivalence("path/to/model", backends=("torch", "tf"))

or run `pytest --opt-verify-model path/to/model [--opt-verify-backends torch,flax]`, which adds one
test, `opt-verify[path/to/model]`, to the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from opt_verify.testing import assert_equivalent
from opt_verify.verify import BACKENDS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("opt-verify")
    group.addoption("--opt-verify-model", action="append", default=[], metavar="DIR",
                    help="verify this OPT checkpoint across backends (repeatable)")
    group.addoption("--opt-verify-backends", default=",".join(BACKENDS),
                    help="comma-separated backends for --opt-verify-model (default: all)")
    group.addoption("--opt-verify-dtype", default="float32", help="dtype for --opt-verify-model")


@pytest.fixture
def opt_equivalence() -> Callable[..., Any]:
    """`opt_equivalence(model_dir, backends=..., dtype=..., **verify_kwargs)`: fails the test with
    the report table unless every backend agrees; returns the report."""
    return assert_equivalent


class _VerifyItem(pytest.Item):
    def __init__(self, *, model_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def runtest(self) -> None:
        opts = self.config.option
        backends = tuple(b.strip() for b in opts.opt_verify_backends.split(",") if b.strip())
        assert_equivalent(self.model_dir, backends=backends, dtype=opts.opt_verify_dtype)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        return str(excinfo.value)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"opt-verify[{self.model_dir}]"


class _VerifyCollector(pytest.Collector):
    def collect(self) -> list[pytest.Item]:
        return [
            _VerifyItem.from_parent(self, name=f"opt-verify[{d}]", model_dir=d)
            for d in self.config.getoption("opt_verify_model")
        ]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if not config.getoption("opt_verify_model"):
        return
    collector = _VerifyCollector.from_parent(session, name="opt-verify")
    items.extend(collector.collect())
