"""Keep the frameworks' start-up chatter off the terminal (unless `opt --verbose`).

TensorFlow, absl, oneDNN, XLA and the CUDA stubs write log lines to file descriptor 2 from C++
(some before any Python setting can reach them), `tf.function` logs retracing warnings, and Keras
raises `UserWarning`s about its own internals. None of it is actionable for an `opt` user. `configure`
runs in `opt_cli.main` before any framework is imported; `import_quietly` imports a framework with
fd 2 captured and writes back every captured line that is not such chatter. Warnings raised by this
project's own modules are untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from types import ModuleType

_state = {"quiet": False}

# Environment read by the frameworks at import. setdefault: a user's own setting wins.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow C++ INFO/WARNING/ERROR (CUDA stub, XLA service lines)
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "3",
}

# Python loggers of the frameworks, raised to ERROR (tf.function retracing, absl, JAX's CUDA fallback).
QUIET_LOGGERS = ("tensorflow", "absl", "keras", "jax._src.xla_bridge", "jax._src.cloud_tpu_init", "h5py")

# Modules whose UserWarning / FutureWarning / DeprecationWarning are framework internals.
QUIET_WARNING_MODULES = r"(tensorflow|keras|tf_keras|absl|jax|jaxlib|flax|optax|orbax|google\.protobuf)(\.|$)"

# Lines written to fd 2 while a framework is imported that are chatter, not errors of this program.
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] .*"  # absl / glog format: I0000 00:00:17.81 7322 port.cc:153]
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] .*"  # TensorFlow's older format
    r"|To enable the following instructions: .*"  # the second line of cpu_feature_guard's message
    r"|.*rebuild TensorFlow with the appropriate compiler flags\.?"
    r"|.*oneDNN custom operations are on.*"
    r"|.*(Unable to register cu(DNN|FFT|BLAS) factory|Could not find cuda drivers|failed call to cuInit).*"
    r"|.*TF-TRT Warning: Could not find TensorRT.*)$"
)


def configure(verbose: bool) -> None:
    """Set the environment, logger levels and warning filters; call before importing a framework."""
    _state["quiet"] = not verbose
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning, DeprecationWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_WARNING_MODULES)


def is_quiet() -> bool:
    return _state["quiet"]


def is_noise(line: str) -> bool:
    """True for a framework log line `opt` hides (see NOISE)."""
    return bool(NOISE.match(line.rstrip("\r\n")))


@contextlib.contextmanager
def captured_stderr() -> Iterator[None]:
    """Capture fd 2 (C++ and Python writes alike); afterwards write back the lines that are not noise.

    A no-op under `--verbose`. On an exception everything captured is written back.
    """
    if not is_quiet():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            keep = [ln for ln in text.splitlines(keepends=True) if not ok or not is_noise(ln)]
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()


def import_quietly(name: str) -> ModuleType:
    """`importlib.import_module(name)` with the import's chatter filtered (see `captured_stderr`)."""
    if name in sys.modules:
        return sys.modules[name]
    with captured_stderr():
        module = importlib.import_module(name)
    if is_quiet():  # frameworks may reset their loggers at import
        for logger in QUIET_LOGGERS:
            logging.getLogger(logger).setLevel(logging.ERROR)
    return module
