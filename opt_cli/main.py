"""`opt`: the command line. Subcommands live in `opt_cli/commands_*.py` (listed in
`opt_cli.registry.COMMAND_MODULES`) and import their backend lazily, so `opt --help` is instant and a
missing backend is a clear message, not a traceback.

Exit codes: 0 success, 1 the work failed or an input was unusable, 2 a bad argument, 130 Ctrl-C,
141 the reader of the output went away (`opt generate ... | head -1`: quietly, like any Unix tool).
Every failure is one line on stderr, `opt CMD: ...`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from opt_cli import quiet, version
from opt_cli.errors import InputError, UsageError
from opt_cli.registry import COMMAND_MODULES, COMMANDS, ArgumentParser, HelpFormatter
from opt_core.formats.base import CheckpointError

VERBOSE_HELP = "let the frameworks' own log lines and warnings through (TensorFlow, absl, XLA, Keras, JAX)"


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:  # importing a command module registers its subcommand
        importlib.import_module(module)
    parser = ArgumentParser(prog="opt", description="OPT models in PyTorch, TensorFlow and JAX/Flax",
                            formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"opt (opt-reference) {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for name, (help_text, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        # also accepted after the command: `opt demo --verbose`
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        p.set_defaults(handler=setup(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (already printed in one line)
        return e.code if isinstance(e.code, int) else 2
    quiet.configure(verbose=args.verbose)  # before any framework is imported
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"\nopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _output_closed()
    except (UsageError, InputError) as e:
        print(f"opt {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except CheckpointError as e:  # a weights file that cannot be used: an unusable input, whichever command read it
        print(f"opt {args.command}: {e}", file=sys.stderr)
        return InputError.exit_code
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"opt {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk: the system's words, one line
        print(f"opt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


def _output_closed() -> int:
    """The reader of stdout went away (`| head -1`): nothing to report to anyone. Point stdout at
    /dev/null so the interpreter's last flush does not raise (and print) the same error again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout already closed or replaced by something without a descriptor
        pass
    return EXIT_OUTPUT_CLOSED


def entry_point() -> None:
    """The `opt` console script: `main`, then exit with its code (Ctrl-C during start-up included)."""
    try:
        code = main()
        sys.stdout.flush()  # here, where a closed pipe is handled, not in the interpreter's shutdown
    except KeyboardInterrupt:
        print("\nopt: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = _output_closed()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
