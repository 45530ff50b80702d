"""Hugging Face safetensors, single file or sharded with `model.safetensors.index.json`.

Read and written with plain file reads and writes at known offsets, not through a memory map: the
pages of a memory-mapped file count towards the process's resident set once touched, so reading a
2.6 GB checkpoint through `safe_open` shows 2.6 GB of RSS even though only one tensor is live.
Headers are checked as strictly as `safe_open` does (offsets contiguous, sizes consistent, the file
as long as the header says) before any tensor is read.

Writing streams: every shard's header is known from the plan before the first tensor arrives, so
each tensor goes straight to its offset in its shard. Peak memory: one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from conversion.formats.base import Reader, Writer, tmp_name
from opt_core.checkpoint import (
    SAFETENSORS,
    SAFETENSORS_INDEX,
    CheckpointError,
    plan_shards,
    read_index,
    shard_file_names,
    write_index,
)

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
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class _Entry:
    __slots__ = ("path", "shape", "dtype", "start", "end")

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, start: int, end: int):
        self.path, self.shape, self.dtype, self.start, self.end = path, shape, dtype, start, end


def read_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate one safetensors file's header: key -> entry, and the metadata.

    Raises:
        CheckpointError: naming the file, when the header is corrupt or the file is truncated.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: header length {n} bytes, file is {size} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, _Entry] = {}
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry for {key} is malformed: {info!r}") from None
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != want:
            raise CheckpointError(
                f"{path}: {key} is {list(shape)} {info['dtype']} ({want} bytes) "
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


class SafetensorsReader(Reader):
    """A safetensors checkpoint folder (single file or index + shards), or a single `.safetensors` file."""

    fmt = "safetensors"

    def __init__(self, path: str | os.PathLike[str]):
        path = Path(path)
        if path.is_file():
            files, folder, weight_map = [path], path.parent, None
        elif (path / SAFETENSORS_INDEX).is_file():
            folder = path
            weight_map = read_index(path / SAFETENSORS_INDEX)
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path / SAFETENSORS_INDEX} names shards that do not exist: {missing}")
            files = [path / s for s in shards]
        elif (path / SAFETENSORS).is_file():
            files, folder, weight_map = [path / SAFETENSORS], path, None
        else:
            raise FileNotFoundError(f"{path} holds no {SAFETENSORS} or {SAFETENSORS_INDEX}")
        super().__init__(path, files)
        self._entries: dict[str, _Entry] = {}
        for file in files:
            entries, _ = read_header(file)
            for key, entry in entries.items():
                if key in self._entries:
                    raise CheckpointError(f"{key} is stored twice: in {self._entries[key].path.name} and {file.name}")
                self._entries[key] = entry
        if weight_map is not None:
            index = folder / SAFETENSORS_INDEX
            wrong = [f"{k} (index: {v}, found in {self._entries[k].path.name})"
                     for k, v in weight_map.items() if k in self._entries and self._entries[k].path.name != v]
            absent = [f"{k} (index: {v})" for k, v in weight_map.items() if k not in self._entries]
            unlisted = [f"{k} (in {e.path.name})" for k, e in self._entries.items() if k not in weight_map]
            problems = []
            if absent:
                problems.append(f"listed but not in their shard: {', '.join(absent)}")
            if wrong:
                problems.append(f"in a different shard than listed: {', '.join(wrong)}")
            if unlisted:
                problems.append(f"in a shard but not in the index: {', '.join(unlisted)}")
            if problems:
                raise CheckpointError(f"{index} disagrees with its shards: " + "; ".join(problems))
        self._files: dict[Path, object] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self._entries.items()}

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key].dtype

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        e = self._entries[key]
        f = self._files.get(e.path)
        if f is None:
            f = self._files[e.path] = open(e.path, "rb")  # noqa: SIM115 (closed in close())
        if out is None or out.shape != e.shape or out.dtype != e.dtype or not out.flags.c_contiguous:
            out = np.empty(e.shape, dtype=e.dtype)
        f.seek(e.start)  # type: ignore[attr-defined]
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = f.readinto(view)  # type: ignore[attr-defined]
        if got != e.end - e.start:
            raise CheckpointError(f"{e.path} is truncated: {key} needs {e.end - e.start} bytes, read {got}")
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files = {}


class SafetensorsWriter(Writer):
    """Streams tensors into `model.safetensors`, or into shards of at most `shard_bytes` plus the index.

    Memory: one tensor (each is written at its precomputed offset as it arrives).
    """

    fmt = "safetensors"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limit = self.shard_bytes if self.shard_bytes else 1 << 62
        sizes = {p.spec.name: p.nbytes for p in self.plan}
        self._shards = plan_shards(sizes, limit)
        self._names = shard_file_names(SAFETENSORS, len(self._shards))
        self._where: dict[str, tuple[int, int]] = {}  # canonical name -> (shard index, absolute offset)
        self._handles: list = []
        for i, (shard, name) in enumerate(zip(self._shards, self._names)):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for cname in shard:
                p = self._by_name[cname]
                header[p.key] = {"dtype": _NAMES[p.dtype], "shape": list(p.spec.shape),
                                 "data_offsets": [offset, offset + p.nbytes]}
                offset += p.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            base = 8 + len(raw)
            off = base
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
        f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

    def commit(self) -> list[Path]:
        self._require_complete()
        out = []
        for f, name in zip(self._handles, self._names):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp_name(self.folder, name), self.folder / name)
            out.append(self.folder / name)
        self._handles = []
        if len(self._shards) > 1:
            weight_map = {self._by_name[c].key: n for shard, n in zip(self._shards, self._names) for c in shard}
            write_index(self.folder / SAFETENSORS_INDEX, weight_map, sum(p.nbytes for p in self.plan))
            out.append(self.folder / SAFETENSORS_INDEX)
        return out

    def abort(self) -> None:
        for f in self._handles:
            f.close()
        self._handles = []
        super().abort()


