"""Where subcommands register themselves, and the help formatter every parser uses.

A command module does

    @register("info", "Describe a model folder")
    def _info(p: argparse.ArgumentParser):
        p.add_argument(...)
        def run(args) -> int: ...
        return run

and `opt_cli.main` imports the module (listed in `COMMAND_MODULES`) to build the parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], Handler]

# name -> (help text, setup); setup adds the subcommand's arguments and returns its handler.
COMMANDS: dict[str, tuple[str, Setup]] = {}

# Imported by `opt_cli.main.build_parser`, in the order `opt --help` lists them.
COMMAND_MODULES = (
    "opt_cli.commands_demo",
    "opt_cli.commands_generate",
    "opt_cli.commands_eval",
    "opt_cli.commands_train",
    "opt_cli.commands_convert",
    "opt_cli.commands_info",
    "opt_cli.commands_verify",
)


def register(name: str, help_text: str) -> Callable[[Setup], Setup]:
    """Decorator: `@register("info", "...")` on a function `(subparser) -> handler`."""

    def wrap(setup: Setup) -> Setup:
        COMMANDS[name] = (help_text, setup)
        return setup

    return wrap


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (argparse's ArgumentDefaultsHelpFormatter, without
    the noise of "(default: None)" / "(default: False)" and without repeating a default the help
    text already states)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "(default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with bad arguments reported in one line (`opt CMD: error: ...; see opt CMD --help`)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
