"""Arguments several commands share, declared once: the model folder, the backend, load options,
threads, decoding. A new load-time flag (a dtype, a quantization, a parallel plan) is one
`add_argument` in `add_load_arguments` and one entry in `load_options`; every command that loads a
model then accepts it and passes it to the adapter's `load(folder, **options)`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from opt_cli.backends import BACKENDS
from opt_cli.errors import UsageError

MAX_SEED = 2**64 - 1


def int_in(lo: int, hi: int | None = None, what: str = "an integer") -> Any:
    """argparse `type=`: an integer in [lo, hi] (a float spelling like 1e20 is rejected, not truncated)."""
    span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]" if hi < 2**32 else f"in [{lo}, 2**{hi.bit_length()})"

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {span}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what} {span}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    """argparse `type=`: a finite float within the bounds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


seed_type = int_in(0, MAX_SEED, "an integer seed")
positive_int = int_in(1)


def add_model_argument(p: argparse.ArgumentParser, default: str | None = "bundled") -> None:
    p.add_argument("--model", default=default, metavar="DIR",
                   help="model folder (Hugging Face layout, with config.json), a Hugging Face Hub id, or 'bundled'")


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", metavar="NAME", help=f"one of: {', '.join(BACKENDS)}")


def add_backends_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default=",".join(BACKENDS), metavar="LIST",
                   help=f"comma-separated, any of: {', '.join(BACKENDS)}")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_type(text: str) -> int:
    """argparse `type=` of --threads: 1 .. the usable CPUs (more threads than CPUs only slow a
    framework down, and asking TensorFlow or torch for 100,000 makes them try to start them)."""
    return int_in(1, usable_cpus(), "an integer (threads, at most the CPUs this process may use)")(text)


threads_type.__name__ = "integer"


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_type, default=None, metavar="N",
                   help="CPU threads to compute with, at most the CPUs this process may use "
                        "(default: the framework's own choice)")


def busy_cpu_hint() -> str | None:
    """A one-line note when the CPUs this process may use are already busy (1-minute load average
    above their number): each framework starts a thread per core, and on a shared machine those
    threads wait on each other at every matmul (README: "Threads on a shared machine")."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system
        return None
    if cpus < 2 or load <= cpus:
        return None
    return (f"note: the CPUs are busy (load average {load:.1f} on {cpus}); on a shared machine --threads 1 "
            "often runs several times faster than the default")


def apply_threads(backend: Any, threads: int | None) -> None:
    """`--threads N` for `backend`, or, left to the framework on a busy machine, `busy_cpu_hint`."""
    if threads:
        backend.set_threads(threads)
    elif not _HINTED and _at_a_terminal() and (hint := busy_cpu_hint()) is not None:
        _HINTED.append(hint)  # once per process (opt demo loads three backends)
        print(hint, file=sys.stderr)


def _at_a_terminal() -> bool:
    """Hints are for a person reading stderr; a script parsing it gets exactly the command's lines."""
    return sys.stderr.isatty()


_HINTED: list[str] = []


def require_distributed_launch(flag: str) -> None:
    """A UsageError unless this process was started by torchrun (which sets WORLD_SIZE), before any
    work: --fsdp and --tp-plan shard over the processes of such a launch."""
    if "WORLD_SIZE" not in os.environ:
        raise UsageError(f"{flag} shards over the processes of a torchrun launch; run "
                         f"`torchrun --nproc-per-node N -m opt_cli.main ... {flag}` (WORLD_SIZE is not set)")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `from_pretrained` that a command passes through (see `load_options`)."""
    p.add_argument("--dtype", default=None, metavar="D", help="float32 (default), bfloat16 or float16")
    p.add_argument("--quantize", default=None, choices=("int8", "int4", "w8a8"),
                   help="int8: int8 weights; int4: 4-bit weight groups (torch only); "
                        "w8a8: int8 weights and activations (inference)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="torch with --quantize w8a8: text to calibrate SmoothQuant factors on (its first 2,048 "
                        "tokens; the factors are cached in $OPT_CACHE, default ~/.cache/opt-reference)")
    p.add_argument("--tp-plan", choices=("auto",), default=None,
                   help="torch under torchrun: shard the model over the ranks (tensor parallelism)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `Adapter.load` from the options `add_load_arguments` declared."""
    if getattr(args, "calibration", None) and getattr(args, "quantize", None) != "w8a8":
        raise UsageError("--calibration needs --quantize w8a8")
    if getattr(args, "calibration", None):
        from opt_core.data import check_text_file

        try:  # by type, before the model loads: a folder, FIFO or device is named as such
            check_text_file(args.calibration, "--calibration")
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
    if getattr(args, "tp_plan", None):
        require_distributed_launch("--tp-plan")
    names = ("dtype", "quantize", "calibration", "tp_plan")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def is_first_rank() -> bool:
    """False on every rank but 0 of a torchrun job (RANK is set by the launcher)."""
    return os.environ.get("RANK", "0") == "0"


def print_on_first_rank_only() -> None:
    """Under torchrun every rank runs the same command: let only rank 0 print."""
    if not is_first_rank():
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 40) -> None:
    g = p.add_argument_group("decoding (unset values: the model's generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help="tokens to generate")
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: the generation config's, else greedy)")
    g.add_argument("--temperature", type=float_in(0.0, lo_open=True), default=None, metavar="T",
                   help="> 0; with --do-sample (default: the generation config's, else 1.0)")
    g.add_argument("--top-k", type=int_in(0), default=None, metavar="K",
                   help=">= 0, 0 disables; with --do-sample (default: the generation config's, else 50)")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=None, metavar="P",
                   help="in (0, 1]; with --do-sample (default: the generation config's, else 1.0)")
    g.add_argument("--repetition-penalty", type=float_in(0.0, lo_open=True), default=None, metavar="R",
                   help="> 0; 1 disables (default: the generation config's, else 1.0)")
    g.add_argument("--seed", type=seed_type, default=None,
                   help="sampling seed, an integer in [0, 2**64) (default: fresh randomness each run)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding keywords the user set (unset ones are left to the model's generation config)."""
    names = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
