"""Reading files a user (or an attacker) hands us, with bounded work.

Every file the library reads goes through here or through `opt_core.formats.base.check_regular_file`,
which uses `check_regular`:

- `check_regular` / `open_regular`: a FIFO, device, socket or folder is refused by its type, from
  `os.stat`, before anything opens it (opening a FIFO blocks; reading `/dev/zero` never ends). The
  open itself is non-blocking and the type is checked again on the open descriptor, so a file swapped
  for a FIFO between the two checks is still refused.
- `read_json`: every JSON file (config.json, generation_config.json, tokenizer files, shard indexes,
  safetensors headers) with a size limit (checked before reading), a value-count limit (before
  parsing), a nesting-depth limit, and one error naming the file. Python's own parser raises
  RecursionError on deep nesting and builds any number of objects.
- `bounded_repr`: the repr of an untrusted object in bounded time and length (`str()` of a pickle's
  shared-subtree tuple is exponential in its depth).
- `check_inside`: a file reached through a folder must really be inside that folder, except the
  Hugging Face cache's own links from `snapshots/<rev>/` into the same repo's `blobs/`.
- `check_revision`: a Hub revision is a branch, tag or commit name, never a path.

Error messages name files, sizes and limits; they never quote bytes of a file they refuse.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

# Limits on JSON files. OPT's largest JSON is tokenizer.json (about 2 MB, 100k values, depth 5);
# a config.json is a few hundred bytes. A parsed value costs Python 50-100 bytes, so a million
# values stays well under 200 MB.
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_JSON_VALUES = 1 << 20
# A config.json or generation_config.json: a few hundred bytes in practice; id2label tables for
# many labels are the only large thing they may hold.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def file_kind(mode: int) -> str:
    """"folder", "FIFO", "device", "socket" or "special file" for a non-regular `st_mode`."""
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def check_regular(path: str | os.PathLike[str], error: type[Exception] = ValueError,
                  what: str = "") -> os.stat_result:
    """The `os.stat` of `path` (symlinks followed) when it is a regular file.

    Raises:
        FileNotFoundError: nothing there.
        `error` (ValueError by default): a FIFO, device, socket or folder, naming the path (and
            `what` it should have been) and its kind.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what + ' ' if what else ''}{path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what + ' ' if what else ''}{path} is a {file_kind(st.st_mode)}, not a regular file; "
                    "refusing to read it")
    return st


def open_regular(path: str | os.PathLike[str], error: type[Exception] = ValueError, what: str = "") -> io.FileIO:
    """`path` opened for binary reading (unbuffered) after `check_regular`; the caller closes it.

    Raises:
        As `check_regular`.
    """
    check_regular(path, error, what)
    # Non-blocking: should the path have become a FIFO since the stat, the open returns at once and
    # the fstat below refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what + ' ' if what else ''}{path} is a {file_kind(mode)}, not a regular file; "
                        "refusing to read it")
        os.set_blocking(fd, True)
        return io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike[str], max_bytes: int, error: type[Exception] = ValueError,
               what: str = "file") -> bytes:
    """The whole of regular file `path`, refused (before reading) above `max_bytes`.

    Raises:
        FileNotFoundError: nothing there. `error`: not a regular file, or larger than `max_bytes`.
    """
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} bytes allowed for it")
        # Read one byte past the limit: a file that grew since the stat is still cut off.
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} {path} is more than the {max_bytes:,} bytes allowed for it")
    return data


def read_text(path: str | os.PathLike[str], max_bytes: int, error: type[Exception] = ValueError,
              what: str = "file") -> str:
    """`read_bytes` decoded as UTF-8.

    Raises:
        As `read_bytes`; `error` for invalid UTF-8 (naming the byte offset, not the bytes).
    """
    data = read_bytes(path, max_bytes, error, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None


# A JSON string: quote, then runs of ordinary characters or escapes, then quote (unrolled so the
# regex engine never backtracks).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Per byte value: +1 opens a container, -1 closes one; and whether it separates values.
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_SEPARATOR = np.zeros(256, np.bool_)
_SEPARATOR[list(b",:")] = True


def json_shape(raw: bytes) -> tuple[int, int]:
    """(maximum nesting depth, number of separators) of JSON text `raw`, ignoring the insides of
    strings; linear time, in chunks of bounded memory, without parsing. Unbalanced or invalid text
    gives some answer; the parser reports it afterwards."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    depth = deepest = separators = 0
    for start in range(0, bare.size, _CHUNK):
        chunk = bare[start : start + _CHUNK]
        running = np.cumsum(_STEP[chunk], dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
        separators += int(np.count_nonzero(_SEPARATOR[chunk]))
    return deepest, separators


_CHUNK = 1 << 20  # bytes per pass of json_shape: about 14 MB of temporaries


def parse_json(raw: bytes, where: str, error: type[Exception] = ValueError, *,
               max_depth: int = MAX_JSON_DEPTH, max_values: int = MAX_JSON_VALUES) -> Any:
    """JSON bytes (from file or header `where`) parsed, within the depth and value limits.

    Raises:
        `error`: invalid UTF-8 or JSON, nesting deeper than `max_depth`, more than `max_values`
            values; the message names `where` and the limit, never the bytes.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    # Counting separators in the raw bytes is an upper bound of the values (strings may hold some);
    # only above the limit is the exact count (strings skipped) worth its cost.
    if raw.count(b",") + raw.count(b":") + 1 > max_values and json_shape(raw)[1] + 1 > max_values:
        raise error(f"{where} holds more than {max_values:,} JSON values, the limit")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:  # the C parser guards its recursion: deep nesting fails fast and safely
        data = _TOO_DEEP
    if data is _TOO_DEEP or _deeper_than(data, max_depth):
        depth = json_shape(raw)[0]
        if depth > max_depth:
            raise error(f"{where} nests JSON {depth} levels deep; the limit is {max_depth}")
    return data


_TOO_DEEP = object()


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether parsed JSON `data` nests containers more than `limit` levels (iterative walk)."""
    todo = [(data, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth + 1 > limit:
                return True
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)
                        if isinstance(v, (dict, list)))
    return False


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError, *, what: str = "JSON file",
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              max_values: int = MAX_JSON_VALUES, expect: type | None = None) -> Any:
    """The parsed JSON of regular file `path`, every limit checked before parsing.

    Args:
        path: the file. error: the exception type raised for a bad file.
        what: how messages call the file ("config file", "shard index", ...).
        max_bytes, max_depth, max_values: the limits (module defaults).
        expect: the type the top-level value must have (e.g. dict), or None.
    Raises:
        FileNotFoundError: nothing there.
        `error`: a special file, too large, invalid UTF-8 or JSON, too deep, too many values, or
            the wrong top-level type; the message names the file and, where one applies, the limit.
    """
    raw = read_bytes(path, max_bytes, error, what)
    data = parse_json(raw, f"{what} {path}", error, max_depth=max_depth, max_values=max_values)
    if expect is not None and not isinstance(data, expect):
        kind = "object" if expect is dict else "array" if expect is list else expect.__name__
        raise error(f"{what} {path} must hold a JSON {kind}, not {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- bounded reprs
def bounded_repr(obj: Any, limit: int = 200, *, depth: int = 4, items: int = 8) -> str:
    """A repr of untrusted `obj` of at most about `limit` characters, in time bounded by
    `items ** depth` whatever the object: containers show their first `items` entries down to
    `depth` levels, big ints their size, other objects their type."""
    out: list[str] = []
    used = 0

    def emit(s: str) -> bool:
        nonlocal used
        out.append(s)
        used += len(s)
        return used < limit

    def walk(x: Any, level: int) -> bool:
        if isinstance(x, bool) or x is None:
            return emit(repr(x))
        if isinstance(x, int):
            return emit(repr(x) if x.bit_length() <= 64 else f"<int of {x.bit_length()} bits>")
        if isinstance(x, float):
            return emit(repr(x))
        if isinstance(x, (str, bytes, bytearray)):
            return emit(repr(x[:limit]) + ("..." if len(x) > limit else ""))
        if isinstance(x, (tuple, list, set, frozenset, dict)):
            brackets = {tuple: "()", list: "[]", dict: "{}"}.get(type(x), "{}")
            open_, close = brackets[0], brackets[1]
            if level >= depth:
                return emit(f"<{type(x).__name__} of {len(x)}>")
            if not emit(open_):
                return False
            entries = list(itertools.islice(x.items() if isinstance(x, dict) else x, items))
            for i, entry in enumerate(entries):
                if i and not emit(", "):
                    return False
                if isinstance(x, dict):
                    if not (walk(entry[0], level + 1) and emit(": ") and walk(entry[1], level + 1)):
                        return False
                elif not walk(entry, level + 1):
                    return False
            if len(x) > len(entries):
                emit(f"{', ' if entries else ''}... {len(x)} in all")
            return emit(close)
        return emit(f"<{type(x).__name__}>")

    walk(obj, 0)
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------- inside the folder
def check_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str],
                 error: type[Exception] = ValueError, what: str = "file") -> Path:
    """`path` (a file named inside `folder`) when its real path, every symlink followed, is still
    inside `folder`'s real path, or is a Hugging Face cache blob of the same repo (`folder` is
    `<repo>/snapshots/<rev>` and the target lies in `<repo>/blobs/`).

    Raises:
        `error`: the link leaves the folder; the message names the link and its target.
    """
    path, folder = Path(path), Path(folder)
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    if real == root or root in real.parents:
        return path
    # The Hub cache: models--org--name/snapshots/<rev>/<file> -> models--org--name/blobs/<sha>.
    # The folder's real path, so a user's link to a snapshot folder is recognised too.
    if root.parent.name == "snapshots":
        blobs = Path(os.path.realpath(root.parent.parent / "blobs"))
        if real.parent == blobs:
            return path
    raise error(
        f"{what} {path} is a link to {real}, outside the model folder {folder}; refusing to read it "
        "(only a Hugging Face cache's snapshots/<rev>/ links into the same repo's blobs/ may leave it)"
    )


# ---------------------------------------------------------------- Hub revisions
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}$")


def check_revision(revision: object) -> str | None:
    """`revision` when it is None, a 40-hex commit, or a branch/tag name git would accept
    (`main`, `v1.0`, `refs/pr/3`); anything that could name a path (`..`, an absolute path, a
    backslash, an empty component) is refused before huggingface_hub sees it.

    Raises:
        ValueError: naming the revision (bounded) and the rule it breaks.
    """
    if revision is None:
        return None
    if not isinstance(revision, str):
        raise ValueError(f"revision must be a branch, tag or commit name, got a {type(revision).__name__}")
    if _HEX40.match(revision):
        return revision
    parts = revision.split("/")
    if (not _REF.match(revision) or ".." in revision or revision.endswith((".", ".lock"))
            or any(not p or p.startswith(".") for p in parts)):
        raise ValueError(
            f"revision {bounded_repr(revision, 80)} is not a branch, tag or 40-hex commit name (letters, digits, "
            "'.', '_', '-', '/' between non-empty parts; no '..', no leading '/' or '.')"
        )
    return revision


__all__ = [
    "MAX_CONFIG_BYTES", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_JSON_VALUES", "bounded_repr", "check_inside",
    "check_regular", "check_revision", "file_kind", "json_shape", "open_regular", "parse_json", "read_bytes",
    "read_json", "read_text",
]
