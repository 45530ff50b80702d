"""Writing a model folder so that nothing is lost: the one mechanism behind every `save_pretrained`,
`opt convert`, `opt train` and report output.

    with write_transaction("out/", overwrite=True) as tx:
        write_everything_into(tx.path)       # a fresh temporary folder beside out/
        tx.commit()                          # swap it in; the old model goes only now

What a write owns
    A folder written here holds `.opt-manifest.json`, the list of the entries (files, and folders
    such as `checkpoint-100/`) that the write created. That list, never a name pattern, is what a
    later write may replace or delete. Anything else in the folder is the user's: `overwrite=True`
    refuses a folder holding any such entry, listing them, and deletes nothing. One exception, so
    that a model folder written by Hugging Face, by an older version or by a library call that
    keeps no manifest (`tokenizer.save_pretrained`) can be overwritten: a *regular file* with exactly
    a name a model folder has (`config.json`, `model.safetensors`, `model-00001-of-00002.safetensors`,
    `vocab.json`, ...; `ADOPTABLE`) counts as owned, being what `--overwrite` was asked to replace.
    A folder, a symbolic link, or a name that merely looks like a model file
    (`model-notes-of-2024.safetensors`, `checkpoint-keep/`, a folder named `config.json/`) is never
    adopted.

    `save_pretrained` into a folder that also holds other files (Hugging Face allows it) keeps them:
    it replaces the regular files at exactly the names it writes, removes the weight files of its
    own earlier saves it does not write again (listed in the manifest), and refuses a folder whose
    entries would otherwise contradict the new weights (a folder named `config.json/`, shards or an
    index of another save).

Temporary folders
    `.NAME.opt-tmp-<32 hex>` beside the destination (same file system, so renames are atomic),
    holding the marker `.opt-transaction` (JSON: the random token of the name, the destination, the
    writer's pid and the state). Clean-up removes a temporary folder only when the marker is there,
    is a regular file, names that folder's own token and destination, and its process has ended: a
    user's folder that merely has such a name is never touched.

The swap, and the invariant
    New files are complete (written, flushed, renamed from their own temporary names) in the
    temporary folder before anything in the destination changes. Then:
    * destination absent, empty, or wholly owned: the two folders are exchanged in one step
      (`renameat2(RENAME_EXCHANGE)` on Linux; a missing destination takes the new folder with
      `RENAME_NOREPLACE`, so a folder a user creates meanwhile is never replaced). At every instant
      the destination is the complete old folder or the complete new one. Where the system has no
      exchange, two renames (old -> `.NAME.opt-old-<hex>`, new -> NAME) leave a moment with no
      destination; the journal lets the next write (or `recover`) finish it.
    * destination shared with the user's files (`save_pretrained` only): each old owned entry moves
      to a marked backup folder, each new entry moves in, the manifest last, then the backup is
      deleted. The journal (the marker, state "swapping") is written before the first move, so an
      interruption is rolled forward by `recover`: the new files were complete before it started.
    The old model's files are deleted only after the new ones are in place. Ctrl-C is held back
    during the few renames of the swap (main thread); a hard kill there is what `recover` repairs.

`recover(dst)` runs at the start of every write to `dst`; call it yourself after a crash to settle
the folder before reading it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from opt_core.safe_files import read_json

MANIFEST_NAME = ".opt-manifest.json"
MARKER_NAME = ".opt-transaction"
# Names reserved inside an output folder: only ever regular files this module wrote.
RESERVED = (MANIFEST_NAME, MARKER_NAME)
_TMP_TAG = "opt-tmp"
_OLD_TAG = "opt-old"
_TOKEN = re.compile(r"[0-9a-f]{32}")
_MAX_MANIFEST_BYTES = 1 << 20
_MANIFEST_FORMAT = "opt-manifest"

# Exact names a model folder written by this project (or by Hugging Face) holds; see "What a write
# owns". Shards only with Hugging Face's five-digit numbering.
ADOPTABLE = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "training_args.json", "trainer_log.json", "training_summary.json", "smoothquant.safetensors",
})
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")

# Test hook: `_OPT_TEST_CRASH_AT=STEP` makes the process exit at once (no clean-up, as a kill would)
# when the swap reaches STEP, so tests can check the folder after a crash at every step.
_CRASH_ENV = "_OPT_TEST_CRASH_AT"


class OutputError(OSError):
    """An output folder or file that cannot be written as asked (the message names it and why)."""


class ForeignFilesError(OutputError, FileExistsError):
    """The destination holds entries this project did not write; nothing was deleted."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names

    def __str__(self) -> str:
        return str(self.args[0])


class DestinationExistsError(OutputError, FileExistsError):
    """The destination exists (or appeared while writing) and overwriting was not asked for."""

    def __str__(self) -> str:
        return str(self.args[0])


def is_adoptable(name: str) -> bool:
    """Whether `name` is exactly a file name a model folder holds (see `ADOPTABLE`)."""
    return name in ADOPTABLE or _SHARD.fullmatch(name) is not None


def _crash_point(step: str) -> None:
    if os.environ.get(_CRASH_ENV) == step:
        os._exit(137)


# ---------------------------------------------------------------- small file-system helpers
def entry_kind(path: Path) -> str:
    """'file', 'folder', 'link', 'missing' or 'special' without following a symbolic link."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a/b where a is a file: b cannot exist
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return "special"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary name in the same folder, flushed, then renamed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_small_json(path: Path) -> Any:
    """JSON from a regular file of at most 1 MB (`opt_core.safe_files.read_json`'s depth and size
    limits), or None when it is absent, not regular or invalid: a manifest or marker that cannot be
    read proves nothing, so nothing is removed on its word."""
    if entry_kind(path) != "file":
        return None
    try:
        return read_json(path, what="manifest", max_bytes=_MAX_MANIFEST_BYTES)
    except (OSError, ValueError):
        return None


def _remove_entry(path: Path) -> None:
    if entry_kind(path) == "folder":
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False when the system or the file system does not offer it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, refusing (FileExistsError) when `dst` exists, even an empty folder."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
    if os.path.lexists(dst):  # no renameat2: check, then rename (a narrow window remains)
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back during the renames of a swap; re-raised right after (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: it cannot be put back, so leave it
        yield
        return
    try:
        signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    except (ValueError, TypeError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(*pending[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# ---------------------------------------------------------------- manifests
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, str] | None:
    """The entries `folder/.opt-manifest.json` lists (name -> "file" or "folder"), or None without one.

    Raises:
        OutputError: a manifest that is not a small regular JSON file of the expected form.
    """
    path = Path(folder) / MANIFEST_NAME
    kind = entry_kind(path)
    if kind == "missing":
        return None
    data = _read_small_json(path)
    entries = data.get("entries") if isinstance(data, dict) and data.get("format") == _MANIFEST_FORMAT else None
    if not isinstance(entries, dict) or not all(
        isinstance(k, str) and _plain_name(k) and v in ("file", "folder") for k, v in entries.items()
    ):
        raise OutputError(f"{path} is not a manifest this project wrote (a small JSON object with \"format\": "
                          f"\"{_MANIFEST_FORMAT}\" and \"entries\"); move it away to write into {Path(folder)}")
    return dict(entries)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name \
        and name not in RESERVED


def write_manifest(folder: Path, entries: dict[str, str]) -> None:
    write_json_atomic(folder / MANIFEST_NAME, {"format": _MANIFEST_FORMAT, "version": 1,
                                               "entries": dict(sorted(entries.items()))})


def classify(folder: Path, *, adopt: bool = True) -> tuple[dict[str, str], list[str]]:
    """(owned entries name -> kind, foreign entry names) of an existing folder.

    Owned: what its manifest lists, when the entry on disk still has the listed kind (a listed
    file replaced by a link or a folder is the user's); with `adopt`, also the regular files with
    exactly a model folder's names (`is_adoptable`). The reserved names, as regular files, are owned
    and not listed.
    """
    manifest = read_manifest(folder)
    owned: dict[str, str] = {}
    foreign: list[str] = []
    for entry in sorted(os.listdir(folder)):
        kind = entry_kind(folder / entry)
        if entry in RESERVED and kind == "file":
            continue
        if manifest is not None and manifest.get(entry) == kind:
            owned[entry] = kind
            continue
        if adopt and kind == "file" and is_adoptable(entry):
            owned[entry] = kind
            continue
        foreign.append(entry + ("/" if kind == "folder" else ""))
    return owned, foreign


def _shown(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------- markers and recovery
def _temp_name(dst: Path, tag: str, token: str) -> Path:
    return dst.with_name(f".{dst.name}.{tag}-{token}")


def _marker(folder: Path, dst_name: str, token: str | None = None) -> dict[str, Any] | None:
    """The marker's journal when `folder/.opt-transaction` is ours for `dst_name` (and `token`)."""
    data = _read_small_json(folder / MARKER_NAME)
    if not isinstance(data, dict) or data.get("format") != "opt-transaction" or data.get("dst") != dst_name:
        return None
    if token is not None and data.get("token") != token:
        return None
    if not isinstance(data.get("pid"), int):
        return None
    return data


def _write_marker(folder: Path, journal: dict[str, Any]) -> None:
    write_json_atomic(folder / MARKER_NAME, journal)
    _fsync_dir(folder)


def recover(dst: str | os.PathLike[str], log: Callable[[str], None] | None = None, *,
            ended_token: str | None = None) -> list[str]:
    """Settle `dst` after a write that was killed: finish a swap that had begun (its new files were
    complete), remove the temporary folders of a write that had not, and the backup of old files.
    Only folders carrying a valid marker of a process that has ended are touched (`ended_token`:
    this process's own transaction, settled after an error inside its swap).

    Returns a line per action taken (also passed to `log`).
    """
    dst = Path(dst)
    done: list[str] = []

    def say(line: str) -> None:
        done.append(line)
        if log is not None:
            log(line)

    def ended(journal: dict[str, Any]) -> bool:
        return journal.get("token") == ended_token or not _alive(journal["pid"])

    parent = dst.parent
    if entry_kind(parent) != "folder":
        return done
    # 1. the marker moved into dst with the new folder: the swap happened, the old folder remains
    stray = _marker(dst, dst.name) if entry_kind(dst) == "folder" else None
    if stray is not None and ended(stray):
        for name in stray.get("old_folders", []):
            if isinstance(name, str) and _plain_name(name) and _marker(parent / name, dst.name) is None:
                _delete_old(parent / name, stray)
        (dst / MARKER_NAME).unlink(missing_ok=True)
        say(f"finished the swap of an interrupted write into {dst}")
    prefix = f".{dst.name}."
    try:
        siblings = sorted(os.listdir(parent))
    except OSError:
        return done
    for name in siblings:
        if not name.startswith(prefix):
            continue
        tag, _, token = name[len(prefix):].rpartition("-")
        if tag not in (_TMP_TAG, _OLD_TAG) or not _TOKEN.fullmatch(token):
            continue
        folder = parent / name
        if entry_kind(folder) != "folder":
            continue
        journal = _marker(folder, dst.name, token)
        if journal is None or journal.get("role") != tag or not ended(journal):
            continue  # not ours, or still being written: never touched
        if tag == _OLD_TAG:
            if entry_kind(parent / str(journal.get("tmp_folder"))) == "missing":
                shutil.rmtree(folder)  # the swap had finished; these are the replaced old files
                say(f"removed {folder}, old files of an interrupted write into {dst}")
            continue
        recover(folder, log, ended_token=ended_token)  # a save_pretrained into it killed with it
        state = journal.get("state")
        old = [parent / n for n in journal.get("old_folders", [])
               if isinstance(n, str) and _plain_name(n) and n != name]
        if state == "swapping-files":
            _roll_forward_files(folder, dst, journal)
            say(f"finished the interrupted write into {dst} (its new files were complete)")
        elif state == "swapping-folder" and entry_kind(dst) == "missing":
            # the old folder had moved aside (or there was none): the complete new one takes its place
            os.rename(folder, dst)
            for p in old:
                _delete_old(p, journal)
            (dst / MARKER_NAME).unlink(missing_ok=True)
            say(f"finished the interrupted write into {dst} (its new files were complete)")
        else:  # the swap never began: the destination still holds the old model
            shutil.rmtree(folder)
            say(f"removed {folder}, left by an interrupted write into {dst}")
    return done


def _delete_old(old: Path, journal: dict[str, Any]) -> None:
    """Delete the entries of the replaced folder `old` the journal lists as owned, then the folder if
    that empties it. A user's file that arrived in the meantime stays (with the folder)."""
    if not old.name or entry_kind(old) != "folder":
        return
    owned = journal.get("old_owned", {})
    for name, kind in (owned.items() if isinstance(owned, dict) else ()):
        if isinstance(name, str) and _plain_name(name) and entry_kind(old / name) == kind:
            _remove_entry(old / name)
    for name in RESERVED:
        if entry_kind(old / name) == "file":
            (old / name).unlink()
    with contextlib.suppress(OSError):
        old.rmdir()


def _roll_forward_files(tmp: Path, dst: Path, journal: dict[str, Any]) -> None:
    """Finish an entry-by-entry swap. An old entry always leaves before its replacement arrives, so
    an entry still in `dst` whose backup slot is empty is old: it moves out; then every new entry
    still in `tmp` moves in (the manifest last), and the backup and `tmp` are deleted."""
    backup = dst.parent / journal["backup_folder"]
    backup.mkdir(exist_ok=True)
    for name in journal["old_moves"]:
        ours = _plain_name(name) or name == MANIFEST_NAME
        if ours and entry_kind(dst / name) != "missing" and entry_kind(backup / name) == "missing":
            os.rename(dst / name, backup / name)
    for name in journal["new"]:
        if (_plain_name(name) or name == MANIFEST_NAME) and entry_kind(tmp / name) != "missing":
            os.replace(tmp / name, dst / name)
    shutil.rmtree(backup)
    shutil.rmtree(tmp)


# ---------------------------------------------------------------- the transaction
class WriteTransaction:
    """One write of a folder `dst` through a temporary folder (see the module docstring).

    Args:
        dst: the destination folder.
        overwrite: replace an existing non-empty destination (only what a previous write owns).
        merge: `save_pretrained`'s rule: keep the user's other files in `dst` and replace only the
            names written (see the module docstring); `overwrite` is then not consulted.
        stale: in merge mode, which owned names the new write supersedes even when it does not write
            them again (e.g. the shards of an earlier save); non-owned entries it matches make the
            write refuse.
        what: how errors name the destination ("--out", "DST", "save_pretrained folder").
        log: receives a line for each interrupted earlier write this one settles.
        token: the temporary folder's suffix (default: random), for processes of one job that
            must agree on it (the ranks of a torchrun job).
    Raises (at `begin`):
        DestinationExistsError: a non-empty destination without `overwrite`.
        ForeignFilesError: with `overwrite`, entries the destination holds that no write here owns.
        OutputError: a destination that is not a folder, or where nothing can be created.
    """

    def __init__(self, dst: str | os.PathLike[str], *, overwrite: bool = False, merge: bool = False,
                 stale: Callable[[str], bool] | None = None, what: str = "output folder",
                 log: Callable[[str], None] | None = None, token: str | None = None):
        if token is not None and not _TOKEN.fullmatch(token):
            raise ValueError(f"token must be 32 lowercase hex digits, got {token!r}")
        self.dst = Path(os.path.abspath(dst))
        if entry_kind(self.dst) == "link":
            self.dst = Path(os.path.realpath(self.dst))  # write where the link points, not over the link
        self.overwrite, self.merge, self.stale, self.what, self.log = overwrite, merge, stale, what, log
        self.token = token or secrets.token_hex(16)
        self.path = _temp_name(self.dst, _TMP_TAG, self.token)
        self.existed = False
        self.committed = False
        self.kept: Path | None = None
        self._journal: dict[str, Any] = {}

    def _label(self) -> str:
        return f"{self.what}: {self.dst}"

    def check_destination(self) -> dict[str, str]:
        """Validate `dst` as it is now; returns the owned entries a replacing write would delete."""
        kind = entry_kind(self.dst)
        if kind == "missing":
            return {}
        if kind != "folder":
            raise OutputError(f"{self._label()} is a {'special file' if kind == 'special' else kind}, not a folder; "
                              "choose a new or empty folder")
        try:
            mount = os.stat(self.dst).st_dev != os.stat(self.dst.parent).st_dev
        except OSError:
            mount = False
        if mount:  # renames cannot cross file systems, and the temporary folder sits beside dst
            raise OutputError(f"{self._label()} is a mount point: a write is swapped in from a folder beside it, "
                              "which cannot cross file systems; choose a folder inside it")
        if not os.listdir(self.dst):
            return {}
        owned, foreign = classify(self.dst, adopt=not self.merge)
        if self.merge:
            return owned
        if not self.overwrite:
            raise DestinationExistsError(f"{self._label()} already exists and is not empty; pass --overwrite "
                                         "(overwrite=True) to replace the model a previous run wrote there, "
                                         "or choose a new folder")
        if foreign:
            raise ForeignFilesError(
                f"{self._label()} holds files this command does not write ({_shown(foreign)}); --overwrite "
                f"replaces only what an earlier write listed in {MANIFEST_NAME} (or a plain model folder): "
                "nothing was deleted; move them away or choose another folder", foreign)
        return owned

    def begin(self) -> WriteTransaction:
        """Settle an interrupted earlier write, check the destination, create the temporary folder."""
        if self.dst.parent == self.dst:
            raise OutputError(f"{self._label()} is a file-system root, which cannot be replaced; choose a folder "
                              "inside it")
        recover(self.dst, self.log)
        self.check_destination()
        self.existed = entry_kind(self.dst) == "folder"
        parent = self.dst.parent
        created = False
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
            created = True
            self._journal = {"format": "opt-transaction", "token": self.token, "dst": self.dst.name,
                             "pid": os.getpid(), "role": _TMP_TAG, "state": "writing"}
            _write_marker(self.path, self._journal)
        except OSError as e:
            if created:
                shutil.rmtree(self.path, ignore_errors=True)
            raise OutputError(f"{self._label()} cannot be written: {e.strerror or e} (creating {self.path.name} "
                              f"in {parent})") from None
        _crash_point("begin")
        return self

    def written(self) -> dict[str, str]:
        """The entries written so far into the temporary folder (name -> kind)."""
        return {n: entry_kind(self.path / n) for n in sorted(os.listdir(self.path)) if n not in RESERVED}

    def commit(self) -> Path:
        """Swap the finished temporary folder in (see the module docstring); returns `dst`.

        Raises:
            DestinationExistsError, ForeignFilesError: the destination changed while writing so
                that replacing it would lose a user's file (or, in merge mode, the new files would
                contradict entries the write does not own). Nothing in the destination changed; a
                replacing write keeps its finished output beside it under a visible name
                (`self.kept`, named in the message).
        """
        if self.committed:
            return self.dst
        new = self.written()
        try:
            if self.merge:
                self._commit_merge(new)
            else:
                self._commit_replace(new)
        except (DestinationExistsError, ForeignFilesError) as e:
            if not self.merge:
                self._keep_output(e)
            raise
        self.committed = True
        return self.dst

    def _keep_output(self, error: Exception) -> None:
        kept = self.dst.with_name(f"{self.dst.name}.new-{self.token[:8]}")
        try:
            os.rename(self.path, kept)
            (kept / MARKER_NAME).unlink()
        except OSError:
            return
        self.kept = kept
        error.args = (f"{error.args[0]}; the finished output is kept in {kept}",) + error.args[1:]

    def _commit_replace(self, new: dict[str, str]) -> None:
        if entry_kind(self.dst) != "missing" and not self.existed and not self.overwrite:
            raise DestinationExistsError(f"{self._label()} was created by someone else while this command ran; "
                                         "it is left as it is")
        owned = self.check_destination()
        write_manifest(self.path, new)
        self._swap_folder(owned)

    def _swap_folder(self, owned: dict[str, str]) -> None:
        """Exchange the temporary folder with `dst` (absent, empty or holding only `owned`, as
        checked a moment ago). Whatever appeared in `dst` since is never moved away: an entry that
        is not in `owned` makes the swap go back (or not happen) and raise."""
        expect_missing = entry_kind(self.dst) == "missing"
        self._journal.update(state="swapping-folder", old_owned=owned,
                             old_folders=[self.path.name, _temp_name(self.dst, _OLD_TAG, self.token).name])
        _write_marker(self.path, self._journal)
        _crash_point("journal")
        with _sigint_held():
            if expect_missing:
                try:
                    _rename_noreplace(self.path, self.dst)
                except FileExistsError:  # created between the check and the rename: left alone
                    self._back_to_writing()
                    raise DestinationExistsError(f"{self._label()} was created by someone else while this "
                                                 "command ran; it is left as it is") from None
                _crash_point("renamed")
            elif _renameat2(self.path, self.dst, _RENAME_EXCHANGE):
                # dst is the new folder now (the marker went with it); the old one sits at self.path
                _crash_point("exchanged")
                if self._appeared(self.path):
                    _renameat2(self.path, self.dst, _RENAME_EXCHANGE)  # put it back as it was
                    self._refuse_appeared()
                _delete_old(self.path, self._journal)
            else:
                old = self.dst.parent / self._journal["old_folders"][1]
                os.rename(self.dst, old)
                _crash_point("moved-old")
                if self._appeared(old):
                    os.rename(old, self.dst)
                    self._refuse_appeared()
                os.rename(self.path, self.dst)
                _crash_point("moved-new")
                _delete_old(old, self._journal)
            _crash_point("deleted-old")
            (self.dst / MARKER_NAME).unlink(missing_ok=True)
            _fsync_dir(self.dst.parent)

    def _appeared(self, old: Path) -> list[str]:
        """Entries of the replaced folder `old` that the check before the swap did not find owned."""
        return sorted(n for n in os.listdir(old) if n not in RESERVED and n not in self._journal["old_owned"])

    def _back_to_writing(self) -> None:
        self._journal["state"] = "writing"
        _write_marker(self.path, self._journal)

    def _refuse_appeared(self) -> None:
        self._back_to_writing()
        foreign = self._appeared(self.dst)
        raise ForeignFilesError(f"{self._label()} received files while this command ran ({_shown(foreign)}); "
                                "it is left as it is", foreign)

    def _commit_merge(self, new: dict[str, str]) -> None:
        kind = entry_kind(self.dst)
        manifest = read_manifest(self.dst) if kind == "folder" else None
        owned = self.check_destination()
        names = set(os.listdir(self.dst)) - set(RESERVED) if kind == "folder" else set()
        blocked = [n + ("/" if entry_kind(self.dst / n) == "folder" else "") for n in sorted(new)
                   if n in names and owned.get(n) != new[n] and not (new[n] == "file" == entry_kind(self.dst / n))]
        stale = self.stale or (lambda name: False)
        superseded = [n for n in sorted(names) if n not in new and stale(n)]
        conflicting = [n for n in superseded if n not in owned]
        if blocked or conflicting:
            bad = blocked + conflicting
            raise ForeignFilesError(
                f"{self._label()} holds entries this save would have to replace or would leave contradicting the "
                f"new weights ({_shown(bad)}), and did not write them; nothing was deleted: move them away or "
                "choose another folder", bad)
        removed = [n for n in superseded if n in owned]
        entries = {n: k for n, k in (manifest or {}).items() if n in owned and n not in removed}
        entries.update(new)
        write_manifest(self.path, entries)
        if kind == "missing" or not os.listdir(self.dst):
            self._swap_folder({})  # nothing there to keep: one folder swap
            return
        moves = sorted(n for n in names if n in new or n in removed)
        if (self.dst / MANIFEST_NAME).exists():
            moves.append(MANIFEST_NAME)
        backup = _temp_name(self.dst, _OLD_TAG, self.token)
        self._journal.update(state="swapping-files", new=sorted(new) + [MANIFEST_NAME], old_moves=moves,
                             backup_folder=backup.name)
        _write_marker(self.path, self._journal)  # first: from here on, recover() finishes the swap
        backup.mkdir()
        _write_marker(backup, {**self._journal, "role": _OLD_TAG, "tmp_folder": self.path.name})
        _crash_point("files-journal")
        with _sigint_held():
            for i, name in enumerate(moves):
                os.rename(self.dst / name, backup / name)
                _crash_point(f"moved-old-{i}")
            for i, name in enumerate(self._journal["new"]):
                os.replace(self.path / name, self.dst / name)
                _crash_point(f"moved-new-{i}")
            _fsync_dir(self.dst)
            shutil.rmtree(self.path)
            _crash_point("deleted-tmp")
            shutil.rmtree(backup)

    def abort(self) -> None:
        """Undo a write that did not commit: remove its temporary folder (the destination is
        untouched). A swap interrupted by an error after its journal was written is settled as
        `recover` settles a killed one (finished, the new files being complete)."""
        if self.committed:
            return
        journal = _marker(self.path, self.dst.name, self.token) if entry_kind(self.path) == "folder" else None
        if self._journal.get("state", "writing") != "writing" or (journal and journal.get("state") != "writing"):
            recover(self.dst, self.log, ended_token=self.token)
            return
        if journal is not None:
            recover(self.path, self.log, ended_token=self.token)  # what a failed nested save left
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> WriteTransaction:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


def write_transaction(dst: str | os.PathLike[str], **options: Any) -> WriteTransaction:
    """A `WriteTransaction` for `dst` (use it as a context manager); see the class for the options."""
    return WriteTransaction(dst, **options)


# ---------------------------------------------------------------- report files
def check_report_path(path: str | os.PathLike[str], *, force: bool, what: str,
                      inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Validate a report output file before any work: its folder exists and is writable, it is not
    a folder or special file, not one of the `inputs` files, neither an existing file of an input
    folder nor a model-folder name there (`config.json`, a weight file: even with `force`), and an
    existing file is replaced only with `force`.

    Raises:
        OutputError: naming `what` and the path.
    """
    path = Path(path)
    kind = entry_kind(path)
    if kind == "link":
        kind = "link" if not path.exists() else ("file" if path.is_file() else "special")
    if kind not in ("missing", "file"):
        raise OutputError(f"{what}: {path} is a {'special file' if kind == 'special' else kind}, not a regular file")
    real = Path(os.path.realpath(path))
    for inp in inputs:
        r = Path(os.path.realpath(inp))
        if real == r:
            raise OutputError(f"{what}: {path} is an input of this command; choose another file")
        if real.parent == r and (kind != "missing" or is_adoptable(real.name) or real.name in RESERVED):
            raise OutputError(f"{what}: {path} would replace a file of the input folder {inp}; choose another file")
    if kind == "file" and not force:
        raise OutputError(f"{what}: {path} already exists; pass --force to replace it")
    parent = real.parent
    if not parent.is_dir():
        raise OutputError(f"{what}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot write in {parent} (permission denied)")
    return path


def write_report_file(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` through a temporary name beside it (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "ADOPTABLE", "MANIFEST_NAME", "MARKER_NAME", "DestinationExistsError", "ForeignFilesError", "OutputError",
    "entry_kind",
    "WriteTransaction", "check_report_path", "classify", "is_adoptable", "read_manifest", "recover",
    "write_json_atomic", "write_manifest", "write_report_file", "write_transaction",
]
