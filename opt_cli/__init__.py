"""The `opt` command line.

Layout (no module imports one that imports it back):

    errors    UsageError / InputError, the one-line failures
    quiet     keeps framework start-up chatter off stderr (set before any framework is imported)
    registry  `@register(name, help)` and the help formatter; the parser is built in `main`
    paths     checking the folders and files a command is given (`bundled` accepted for every model)
    backends  THE adapter table: backend name -> adapter (load, new, generate, score, threads)
    commands_*  one module per subcommand, each `@register`ed
    main      `opt` itself: global options, dispatch, exit codes
"""

from __future__ import annotations


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("opt-reference")
    except metadata.PackageNotFoundError:
        return "0.1.0+source"
