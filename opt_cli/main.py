"""`opt`: the command line. Subcommands live in `opt_cli.commands` and import their backend lazily,
so `opt --help` is instant and a missing backend is a clear message, not a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], Handler]

# name -> (help text, setup); setup adds the subcommand's arguments and returns its handler.
COMMANDS: dict[str, tuple[str, Setup]] = {}


class UsageError(Exception):
    """A bad input from the user: printed as one paragraph, exit code 2."""


def register(name: str, help_text: str) -> Callable[[Setup], Setup]:
    """Decorator: `@register("info", "...")` on a function `(subparser) -> handler`."""

    def wrap(setup: Setup) -> Setup:
        COMMANDS[name] = (help_text, setup)
        return setup

    return wrap


def build_parser() -> argparse.ArgumentParser:
    # Importing a command module registers its subcommand (each imports its backend lazily).
    import opt_cli.commands  # noqa: F401  (opt demo)
    import opt_cli.commands_convert  # noqa: F401  (opt convert)
    import opt_cli.commands_eval  # noqa: F401  (opt eval-ppl)
    import opt_cli.commands_generate  # noqa: F401  (opt generate)
    import opt_cli.commands_info  # noqa: F401  (opt info)
    import opt_cli.commands_train  # noqa: F401  (opt train)
    import opt_cli.commands_verify  # noqa: F401  (opt verify)

    parser = argparse.ArgumentParser(prog="opt", description="OPT models in PyTorch, TensorFlow and JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=setup(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"opt {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
