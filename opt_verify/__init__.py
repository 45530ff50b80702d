"""Cross-framework equivalence reports for any OPT checkpoint (`opt verify`).

Loads one Hugging Face-layout folder in the PyTorch, TensorFlow and JAX/Flax backends (and in the
float64 NumPy reference when the model has at most 400M parameters), runs the same left-padded
batch through each, and compares every pair at real tokens: logits (max absolute and relative
error), hidden states layer by layer (naming the first layer that diverges) and greedy decoding (the
first new token that differs). Pass/fail uses the tolerance table `TOLERANCES` for the dtype.

Command line (exit code 0 when everything agrees, 1 when not, 2 on bad input):

    opt verify path/to/model --backends torch,tf,flax --new-tokens 16 --json out.json --markdown out.md

From Python:

    from opt_verify import verify, format_table
    report = verify("path/to/model", backends=("torch", "flax"), dtype="float32")
    print(format_table(report)); report.passed

In your own test suite, one line:

    from opt_verify.testing import assert_equivalent
    def test_checkpoint():
        assert_equivalent("path/to/model", backends=("torch", "flax"))

or, with `pytest_plugins = ["opt_verify.pytest_plugin"]` in a conftest.py, the `opt_equivalence`
fixture (`opt_equivalence("path/to/model")`) or `pytest --opt-verify-model path/to/model`.
"""

from opt_verify.comparison import PairResult
from opt_verify.inputs import DEFAULT_PROMPTS, VerifyError
from opt_verify.report import BackendResult, VerifyReport, format_table, to_markdown, write_json, write_markdown
from opt_verify.tolerances import TOLERANCES, Tolerance
from opt_verify.verify import BACKENDS, REFERENCE_MAX_PARAMS, verify

__all__ = [
    "BACKENDS",
    "DEFAULT_PROMPTS",
    "REFERENCE_MAX_PARAMS",
    "TOLERANCES",
    "BackendResult",
    "PairResult",
    "Tolerance",
    "VerifyError",
    "VerifyReport",
    "format_table",
    "to_markdown",
    "verify",
    "write_json",
    "write_markdown",
]
