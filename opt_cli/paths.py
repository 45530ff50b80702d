"""Checking the folders and files an `opt` command is given, before any framework is imported.

Every model-folder argument accepts `bundled` (the model shipped in the package). Each check raises
`UsageError` with one line that names the argument and says what it accepts.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opt_cli.errors import UsageError

BUNDLED = "bundled"
MODEL_FOLDER = ("a model folder holding config.json (Hugging Face layout), a Hugging Face Hub id like "
                "facebook/opt-125m, or 'bundled' for the shipped model")


def bundled_folder() -> Path:
    from opt_core import bundled

    return bundled.path()


def _kind(path: Path) -> str:
    """'folder', 'file', 'missing' or what else the path is (a FIFO, a socket, a device)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # a/b where a is a file: b cannot exist
        return "missing"
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device or special file"


def is_regular_file(path: Path) -> bool:
    """True for a regular file (never opens it: a FIFO would block)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def hub_folder(arg: str | os.PathLike[str], what: str) -> Path:
    """`arg` as a path; a Hugging Face Hub id (`facebook/opt-125m`, not a local path) resolves to its
    snapshot in the Hub cache (`HF_HOME`, `HF_HUB_OFFLINE`), downloaded where the network allows."""
    from opt_core.hub import is_hub_id, resolve_pretrained

    if not is_hub_id(arg):
        return Path(arg)
    try:
        return resolve_pretrained(arg)
    except FileNotFoundError as e:
        raise UsageError(f"{what}: {e}") from None


def model_folder(arg: str | os.PathLike[str], what: str = "--model") -> Path:
    """`bundled` -> the shipped model; otherwise a folder that must hold a regular `config.json`."""
    if str(arg) == BUNDLED:
        return bundled_folder()
    folder = hub_folder(arg, what)
    kind = _kind(folder)
    if kind == "missing":
        raise UsageError(f"{what}: {folder} does not exist; expected {MODEL_FOLDER}")
    if kind != "folder":
        raise UsageError(f"{what}: {folder} is a {kind}, not a folder; expected {MODEL_FOLDER}")
    config = folder / "config.json"
    if not is_regular_file(config):
        why = "holds no config.json" if _kind(config) == "missing" else f"has a config.json that is a {_kind(config)}"
        raise UsageError(f"{what}: {folder} {why}; expected {MODEL_FOLDER}")
    return folder


def tokenizer_folder(arg: str | os.PathLike[str], what: str = "--tokenizer") -> Path:
    """`bundled` -> the shipped model; otherwise a folder holding vocab.json and merges.txt."""
    folder = bundled_folder() if str(arg) == BUNDLED else Path(arg)
    kind = _kind(folder)
    expected = "a folder holding vocab.json and merges.txt (a model folder, or 'bundled')"
    if kind == "missing":
        raise UsageError(f"{what}: {folder} does not exist; expected {expected}")
    if kind != "folder":
        raise UsageError(f"{what}: {folder} is a {kind}, not a folder; expected {expected}")
    missing = [f for f in ("vocab.json", "merges.txt") if not is_regular_file(folder / f)]
    if missing:
        raise UsageError(f"{what}: tokenizer files missing in {folder}: {', '.join(missing)}; expected {expected}")
    return folder


def input_file(arg: str | os.PathLike[str], what: str) -> Path:
    """A regular file that exists (a folder or a FIFO is a one-line error, never a hang)."""
    path = Path(arg)
    kind = _kind(path)
    if kind == "missing":
        raise UsageError(f"{what}: {path} does not exist")
    if kind != "file":
        raise UsageError(f"{what}: {path} is a {kind}, not a regular file")
    return path


def _inside_package(path: Path) -> bool:
    import opt_core

    package = Path(os.path.realpath(Path(opt_core.__file__).parent.parent))
    real = Path(os.path.realpath(path))
    return any(real == package / name or package / name in real.parents
               for name in ("opt_core", "opt_torch", "opt_tf", "opt_flax", "opt_cli", "opt_verify", "conversion"))


def _probe_writable(dst: Path, what: str) -> None:
    """Create and remove a marked temporary folder where the write will create its own, so that a
    folder nobody can write in (`/proc/x`, a read-only mount) fails now, not after the work."""
    import secrets

    from opt_core.transaction import MARKER_NAME, entry_kind

    ancestor = dst.parent
    while entry_kind(ancestor) == "missing" and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if _kind(ancestor) != "folder":  # following a link to a folder, as mkdir does
        raise UsageError(f"{what}: cannot create {dst}: {ancestor} is a {_kind(ancestor)}, not a folder")
    probe = ancestor / f".{dst.name}.opt-tmp-{secrets.token_hex(16)}"
    try:
        probe.mkdir()
        (probe / MARKER_NAME).write_text("{}", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{what}: cannot write {dst}: {e.strerror or e} in {ancestor}") from None
    finally:
        if probe.is_dir():
            (probe / MARKER_NAME).unlink(missing_ok=True)
            probe.rmdir()


def output_folder(arg: str | os.PathLike[str], overwrite: bool, *, what: str = "--out",
                  inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Check an output folder before any work (the write itself is `opt_core.transaction`): missing
    or empty is fine; a non-empty one needs `--overwrite`, and even then may hold only what an
    earlier write owns (its manifest, or a plain model folder); it must be creatable (a writable
    place, not a file, not inside the installed package) and hold none of the `inputs` files.

    Returns the folder (not created). Raises UsageError.
    """
    from opt_core.transaction import OutputError, WriteTransaction

    folder = Path(arg)
    if str(arg) == BUNDLED or _inside_package(folder):
        raise UsageError(f"{what}: refusing to write into the installed package ({folder}); choose another folder")
    tx = WriteTransaction(folder, overwrite=overwrite, what=what)
    if tx.dst.parent == tx.dst:
        raise UsageError(f"{what}: {folder} is a file-system root; choose a folder inside it")
    if _kind(tx.dst) not in ("missing", "folder"):
        raise UsageError(f"{what}: {folder} is a {_kind(tx.dst)}, not a folder; choose a new or empty folder")
    for inp in inputs:
        real, target = Path(os.path.realpath(inp)), Path(os.path.realpath(folder))
        if real == target or target in real.parents:
            raise UsageError(f"{what}: {folder} holds the input {inp}; choose another output folder")
    try:
        tx.check_destination()
    except OutputError as e:
        raise UsageError(str(e)) from None
    _probe_writable(Path(os.path.abspath(folder)), what)
    return folder


def output_transaction(arg: str | os.PathLike[str], overwrite: bool, *, what: str = "--out",
                       inputs: Iterable[str | os.PathLike[str]] = (), token: str | None = None,
                       begin: bool = True) -> Any:
    """`output_folder`'s checks, then a begun `WriteTransaction` whose temporary folder the
    command writes into (commit it at the end, or `abort`). Lines about an interrupted earlier write
    it settles go to stderr. `begin=False` only names the temporary folder (the other ranks of a job
    whose rank 0 begins it, with the same `token`)."""
    from opt_core.transaction import OutputError, WriteTransaction

    folder = output_folder(arg, overwrite, what=what, inputs=inputs)
    tx = WriteTransaction(folder, overwrite=overwrite, what=what, log=lambda line: print(line, file=sys.stderr),
                          token=token)
    try:
        return tx.begin() if begin else tx
    except OutputError as e:
        raise UsageError(str(e)) from None


def settle_output(arg: str | os.PathLike[str]) -> list[str]:
    """Settle what an interrupted earlier write left at `arg` (`opt_core.transaction.recover`),
    reporting each action on stderr."""
    from opt_core.transaction import recover

    return recover(Path(os.path.abspath(arg)), log=lambda line: print(line, file=sys.stderr))


def report_file(arg: str | os.PathLike[str] | None, force: bool, what: str,
                inputs: Iterable[str | os.PathLike[str]] = ()) -> Path | None:
    """Check a report output file (`--json OUT`, `--markdown OUT`) before any work: an existing
    file is replaced only with `--force`; a folder, special file or an input is refused.
    Returns the path (None for None). Raises UsageError."""
    from opt_core.transaction import OutputError, check_report_path

    if arg is None:
        return None
    try:
        return check_report_path(arg, force=force, what=what, inputs=inputs)
    except OutputError as e:
        raise UsageError(str(e)) from None
