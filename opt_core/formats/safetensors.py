"""Hugging Face safetensors, single file or sharded with `model.safetensors.index.json`.

Read with plain file reads at known offsets, not through a memory map: the pages of a memory-mapped
file count towards the process's resident set once touched, so reading a 2.6 GB checkpoint through
`safe_open` shows 2.6 GB of RSS even though only one tensor is live. Headers are checked as strictly
as `safe_open` does (offsets tile the data, sizes consistent, the file as long as the header says)
before any tensor is read. `get_slice` reads only the rows a tensor-parallel shard needs.

Writing streams: every shard's header is known from the plan before the first tensor arrives, so
each tensor goes straight to its offset in its shard. Peak memory: one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from opt_core.formats.base import (
    CheckpointError,
    Reader,
    TensorPlan,
    TensorSlice,
    Writer,
    final_permissions,
    open_file,
    out_array,
    read_exact,
    tmp_name,
)
from opt_core.formats.files import (
    SAFETENSORS,
    plan_shards,
    resolve_files,
    shard_file_names,
    write_index,
)
from opt_core.safe_files import bounded_repr, parse_json

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# safetensors itself allows 100 MB; real headers are kilobytes (opt-175b's whole table is ~200 KB),
# and parsing a hostile 100 MB header costs several times that in memory.
_MAX_HEADER = 16 * 1024 * 1024


class _Entry:
    __slots__ = ("path", "shape", "dtype", "start", "end")

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, start: int, end: int):
        self.path, self.shape, self.dtype, self.start, self.end = path, shape, dtype, start, end


def read_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate one safetensors file's header: key -> entry, and the metadata.

    Raises:
        CheckpointError: naming the file, when the header is corrupt or the file is truncated.
    """
    with open_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        # The length is not quoted: for a file that is not safetensors at all (a link to
        # /etc/passwd) these are its first 8 bytes.
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: the header length it starts with is larger than "
                f"the file ({size} bytes) or than this reader's {_MAX_HEADER:,}-byte limit"
            )
        raw = f.read(n)
    header = parse_json(raw, f"the safetensors header of {path}", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: the safetensors header's __metadata__ must be an object of strings (as safetensors requires)"
        )
    base = 8 + n
    entries: dict[str, _Entry] = {}
    for key, info in header.items():
        try:
            if not isinstance(info["dtype"], str) or not isinstance(info["shape"], list):
                raise TypeError
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(
                    f"{path}: {bounded_repr(key, 120)} has dtype {bounded_repr(info['dtype'], 40)}, which OPT "
                    "weights never use"
                )
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            offsets = info["data_offsets"]
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(type(v) is int and v >= 0 for v in (*shape, *offsets))):
                raise ValueError
            start, end = offsets
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CheckpointError(
                f"{path}: header entry for {bounded_repr(key, 120)} is malformed (it needs dtype, shape: a list of "
                "non-negative integers, and data_offsets: two non-negative integers)"
            ) from None
        want = math.prod(shape) * dtype.itemsize  # exact: a hostile shape must not wrap around int64
        if end - start != want:
            raise CheckpointError(
                f"{path}: {bounded_repr(key, 120)} is {bounded_repr(list(shape), 120)} {info['dtype']} "
                f"({bounded_repr(want)} bytes) "
                f"but its offsets span {end - start} bytes"
            )
        entries[key] = _Entry(path, shape, dtype, base + start, base + end)
    # Offsets must tile the data section exactly, as safetensors itself requires.
    pos = base
    for e in sorted(entries.values(), key=lambda e: e.start):
        if e.start != pos:
            raise CheckpointError(f"{path}: tensor data offsets overlap or leave gaps (at byte {e.start - base})")
        pos = e.end
    if pos != size:
        if pos > size:
            raise CheckpointError(
                f"{path} is truncated: the header describes {pos} bytes, the file has {size} "
                f"({pos - size} bytes missing)"
            )
        raise CheckpointError(f"{path} has {size - pos} trailing bytes after the last tensor")
    return entries, {str(k): str(v) for k, v in metadata.items()}


class _Slice(TensorSlice):
    """Rows of a safetensors tensor read straight from the file (`[a:b]` or `[a:b, c:d]`)."""

    def __getitem__(self, index: Any) -> np.ndarray:
        e = self.reader._entries[self.key]  # type: ignore[attr-defined]
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0] if index else slice(None)
        if not self.shape or not isinstance(rows, slice) or rows.step not in (None, 1):
            return super().__getitem__(index)
        lo, hi, _ = rows.indices(self.shape[0])
        hi = max(lo, hi)
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * e.dtype.itemsize
        out = np.empty((hi - lo, *self.shape[1:]), dtype=e.dtype)
        f = self.reader._file(e.path)  # type: ignore[attr-defined]
        f.seek(e.start + lo * row_bytes)
        read_exact(f, out.reshape(-1).view(np.uint8).data, e.path, self.key)
        rest = (slice(None), *index[1:])
        return np.ascontiguousarray(out[rest]) if len(index) > 1 else out


class SafetensorsReader(Reader):
    """A safetensors checkpoint: one file, or the shards of an index (resolved by `resolve_files`)."""

    fmt = "safetensors"
    reads_row_slices = True

    def __init__(self, path: str | os.PathLike[str], config: Any = None, *, files: list[Path] | None = None,
                 weight_map: Mapping[str, str] | None = None):
        path = Path(path)
        if files is None:
            files, weight_map = resolve_files(path, self.fmt)
        super().__init__(path, files)
        self._entries: dict[str, _Entry] = {}
        for file in files:
            entries, _ = read_header(file)
            for key, entry in entries.items():
                if key in self._entries:
                    raise CheckpointError(f"{key} is stored twice: in {self._entries[key].path.name} and {file.name}")
                self._entries[key] = entry
        if weight_map is not None:
            check_index(path, weight_map, {k: e.path.name for k, e in self._entries.items()})
        self._handles: dict[Path, Any] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self._entries.items()}

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key].dtype

    def where(self, key: str) -> str:
        return str(self._entries[key].path)

    def _file(self, path: Path) -> Any:
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open_file(path)
        return f

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        e = self._entries[key]
        out = out_array(out, e.shape, e.dtype)
        f = self._file(e.path)
        f.seek(e.start)
        read_exact(f, out.reshape(-1).view(np.uint8).data, e.path, key)
        return out

    def get_slice(self, key: str) -> TensorSlice:
        return _Slice(self, key)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}


def check_index(folder: Path, weight_map: Mapping[str, str], found: Mapping[str, str]) -> None:
    """Raise when an index (key -> shard name) disagrees with where the shards hold each key."""
    absent = [f"{k} (index: {v})" for k, v in weight_map.items() if k not in found]
    wrong = [f"{k} (index: {v}, found in {found[k]})" for k, v in weight_map.items() if k in found and found[k] != v]
    unlisted = [f"{k} (in {v})" for k, v in found.items() if k not in weight_map]
    problems = []
    if absent:
        problems.append(f"listed but not in their shard: {', '.join(absent)}")
    if wrong:
        problems.append(f"in a different shard than listed: {', '.join(wrong)}")
    if unlisted:
        problems.append(f"in a shard but not in the index: {', '.join(unlisted)}")
    if problems:
        raise CheckpointError(f"the index in {folder} disagrees with its shards: " + "; ".join(problems))


class SafetensorsWriter(Writer):
    """Streams tensors into `model.safetensors`, or into shards of at most `shard_bytes` plus the index.

    Memory: one tensor (each is written at its precomputed offset as it arrives).
    """

    fmt = "safetensors"

    def __init__(self, *args: Any, base_name: str = SAFETENSORS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.base_name = base_name
        limit = self.shard_bytes if self.shard_bytes else 1 << 62
        sizes = {p.spec.name: p.nbytes for p in self.plan}
        self._shards = plan_shards(sizes, limit)
        self._names = shard_file_names(self.base_name, len(self._shards))
        self._where: dict[str, tuple[int, int]] = {}  # canonical name -> (shard index, absolute offset)
        self._handles: list[Any] = []
        for i, (shard, name) in enumerate(zip(self._shards, self._names)):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for cname in shard:
                p = self._by_name[cname]
                if p.dtype not in _NAMES:
                    raise CheckpointError(f"safetensors cannot store {cname} as {p.dtype}")
                header[p.key] = {"dtype": _NAMES[p.dtype], "shape": list(p.spec.shape),
                                 "data_offsets": [offset, offset + p.nbytes]}
                offset += p.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            off = 8 + len(raw)
            for cname in shard:
                self._where[cname] = (i, off)
                off += self._by_name[cname].nbytes
            f = open(tmp_name(self.folder, name), "wb")  # noqa: SIM115 (closed in commit/abort)
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(off)  # reserve the full size; a crash leaves a temp file, never a final one
            self._handles.append(f)

    def write(self, name: str, array: np.ndarray) -> None:
        self._check(name, array)
        i, off = self._where[name]
        f = self._handles[i]
        f.seek(off)
        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def commit(self) -> list[Path]:
        self._require_complete()
        out = []
        for f, name in zip(self._handles, self._names):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            final_permissions(tmp_name(self.folder, name))
            os.replace(tmp_name(self.folder, name), self.folder / name)
            out.append(self.folder / name)
        self._handles = []
        index = self.folder / (self.base_name + ".index.json")
        if len(self._shards) > 1:
            weight_map = {self._by_name[c].key: n for shard, n in zip(self._shards, self._names) for c in shard}
            write_index(index, weight_map, sum(p.nbytes for p in self.plan))
            out.append(index)
        return out

    def abort(self) -> None:
        for f in self._handles:
            f.close()
        self._handles = []
        super().abort()


def save_numpy_safetensors(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    max_shard_bytes: int | str | None = None,
    base_name: str = SAFETENSORS,
) -> list[Path]:
    """Write NumPy tensors (Hugging Face keys, canonical layout) as Hugging Face safetensors: one
    file, or shards plus `model.safetensors.index.json` above `max_shard_bytes` (default 5GB).

    The files are written into a fresh temporary folder and swapped in (`opt_core.transaction`):
    the folder's other files stay; shards and index of an earlier save listed in its manifest go,
    and ones this project did not write make it refuse. Returns the written paths.
    """
    import re

    from opt_core.transaction import WriteTransaction

    stem = base_name.rsplit(".", 1)[0]

    def stale(name: str) -> bool:  # a stale shard or index would confuse a reader
        return name in (base_name, base_name + ".index.json") or \
            re.fullmatch(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors", name) is not None

    with WriteTransaction(folder, merge=True, stale=stale, what="safetensors folder") as tx:
        written = _save_numpy_safetensors(tx.path, tensors, max_shard_bytes, base_name)
        tx.commit()
    return [tx.dst / p.name for p in written]


def _save_numpy_safetensors(folder: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int | str | None,
                            base_name: str) -> list[Path]:
    from opt_core.formats.files import DEFAULT_SHARD_BYTES, parse_size
    from opt_core.params import ParamSpec, Role

    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    plan = [TensorPlan(ParamSpec(k, tuple(a.shape), Role.LINEAR_BIAS), k, a.dtype) for k, a in arrays.items()]
    limit = parse_size(max_shard_bytes if max_shard_bytes is not None else DEFAULT_SHARD_BYTES)
    writer = SafetensorsWriter(folder, plan, None, None, limit, base_name=base_name)  # type: ignore[arg-type]
    try:
        for k, a in arrays.items():
            writer.write(k, a)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
