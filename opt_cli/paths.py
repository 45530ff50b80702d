"""Checking the folders and files an `opt` command is given, before any framework is imported.

Every model-folder argument accepts `bundled` (the model shipped in the package). Each check raises
`UsageError` with one line that names the argument and says what it accepts.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

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
    except FileNotFoundError:
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


def stale_siblings(dst: Path) -> list[Path]:
    """Temporary folders `.DST.tmp-PID` / `.DST.old-PID` beside `dst` left by a killed `opt convert`
    (their process no longer runs)."""
    out = []
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        return out
    for tag in ("tmp", "old"):
        for p in parent.glob(f".{dst.name}.{tag}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _running(int(pid)):
                out.append(p)
    return out


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(dst: Path) -> list[Path]:
    """Remove what `stale_siblings` finds; returns the removed paths."""
    removed = []
    for p in stale_siblings(dst):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def output_folder(arg: str | os.PathLike[str], overwrite: bool, owned: Iterable[str], what: str = "--out") -> Path:
    """Check an output folder before any work: missing or empty is fine; a non-empty one needs
    `--overwrite`, and even then may hold only files this command writes (`owned`: names or
    glob patterns), which the command then replaces. Nothing else is ever deleted.

    Returns the folder (not created). Raises UsageError.
    """
    folder = Path(arg)
    if str(arg) == BUNDLED:
        raise UsageError(f"{what}: refusing to write into the bundled model; choose another folder")
    if folder.name in ("", ".", ".."):  # ".", "..", "a/..": the folder they name, so siblings can be named
        folder = Path(os.path.abspath(folder))
        if not folder.name:
            raise UsageError(f"{what}: {arg} is the root folder; choose a new or empty folder")
    kind = _kind(folder)
    if kind == "missing":
        return folder
    if kind != "folder":
        raise UsageError(f"{what}: {folder} is a {kind}, not a folder; choose a new or empty folder")
    entries = sorted(folder.iterdir())
    if not entries:
        return folder
    if not overwrite:
        raise UsageError(f"{what}: {folder} is not empty; pass --overwrite to replace the model files in it, "
                         "or choose a new folder")
    patterns = list(owned)
    foreign = [p.name for p in entries if not any(p.match(pat) for pat in patterns)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(f"{what}: {folder} holds files this command does not write ({shown}); "
                         "--overwrite replaces model files only: move them away or choose another folder")
    return folder


def clear_owned(folder: Path, owned: Iterable[str]) -> list[str]:
    """Delete the entries of `folder` that match `owned` (after `output_folder` accepted it)."""
    removed = []
    if not folder.is_dir():
        return removed
    patterns = list(owned)
    for p in sorted(folder.iterdir()):
        if any(p.match(pat) for pat in patterns):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    return removed

