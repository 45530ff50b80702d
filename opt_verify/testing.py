"""One-line equivalence checks for your own test suite.

    from opt_verify.testing import assert_equivalent

    def test_my_checkpoint_runs_the_same_everywhere():
        assert_equivalent("path/to/model", backends=("torch", "flax"))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from opt_verify.report import format_table
from opt_verify.verify import BACKENDS, VerifyReport, verify


class EquivalenceError(AssertionError):
    """The implementations disagree; the message is the full report table. `.report` holds it."""

    def __init__(self, report: VerifyReport):
        super().__init__("the OPT implementations disagree:\n" + format_table(report))
        self.report = report


def assert_equivalent(
    model_dir: str | os.PathLike[str],
    backends: Sequence[str] = BACKENDS,
    dtype: str = "float32",
    **kwargs: Any,
) -> VerifyReport:
    """Run `opt_verify.verify` and raise `EquivalenceError` (an AssertionError) unless it passed.

    A requested backend that is not installed fails the check (pass `allow_missing=True` to only
    report it). Other keyword arguments go to `verify` (prompts, input_ids, new_tokens, reference...).
    Returns the report when everything agrees.
    """
    report = verify(model_dir, backends=backends, dtype=dtype, **kwargs)
    if not report.passed:
        raise EquivalenceError(report)
    return report
