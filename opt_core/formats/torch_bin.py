"""PyTorch `pytorch_model.bin` (and metaseq `.pt`) files, without PyTorch and without running code.

A `torch.save` file is a pickle whose tensors point at storages kept beside it: in the zip format
(torch >= 1.6) as `archive/data/<key>` records, in the legacy format as sections after the pickle.
`load_pickle` unpickles with a restricted unpickler that knows only the names a state dict needs
(`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the typed storage classes,
`collections.OrderedDict`); every other global is refused, so no pickled code ever runs. Tensors
come out as `TensorRef`s (shape, stride, dtype, and where their bytes are in the file); `read`
fetches the bytes with plain file reads into the caller's buffer, one tensor at a time.

Writing (`TorchBinWriter`) streams too, with the standard library only: each tensor's bytes go to
`archive/data/<i>` of a stored (uncompressed) zip as they arrive, 64-byte aligned as `torch.save`
aligns them, and the pickle (protocol 2, the opcodes `torch.save` emits), which only references
them, comes last. `torch.load(weights_only=True, mmap=True)` and Hugging Face read the result.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from opt_core.formats.base import (
    CheckpointError,
    Reader,
    Writer,
    final_permissions,
    open_file,
    out_array,
    read_exact,
    tmp_name,
)
from opt_core.formats.files import TORCH_BIN, plan_shards, resolve_files, shard_file_names, write_index
from opt_core.safe_files import bounded_repr

# torch's typed storage class names <-> NumPy dtypes.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {v: k for k, v in STORAGE_DTYPES.items()}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ALIGN = 64  # torch.save's storage alignment
_MAX_PICKLE = 256 * 1024 * 1024  # a state dict's pickle is kilobytes; refuse absurd ones
_MAX_RANK = 8
_MAX_VIEWS_PER_STORAGE = 2  # a tensor and its tied twin


@dataclass
class _StorageRef:
    """One storage: its dtype, element count and where its bytes start in the file."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = -1  # file offset of the bytes (set once known)


@dataclass
class TensorRef:
    """A tensor of a torch file, not yet read: storage, offset into it, shape and strides (elements)."""

    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype


class _Marker:
    """What a refused-nothing global resolves to inside the restricted unpickler."""

    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage: _StorageRef, storage_offset: int, size: Any, stride: Any, *_: Any) -> TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("a tensor in the pickle does not point at a storage")
    if (not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) > _MAX_RANK
            or not all(type(v) is int for v in (*size, *stride, storage_offset))):
        raise CheckpointError(
            f"a tensor in the pickle has shape {bounded_repr(size)}, strides {bounded_repr(stride)} and offset "
            f"{bounded_repr(storage_offset)}; expected tuples of at most {_MAX_RANK} integers"
        )
    shape, strides = tuple(size), tuple(stride)
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise CheckpointError(f"a tensor in the pickle has shape {list(shape)} and strides {list(strides)}")
    extent = 1 + sum((d - 1) * s for d, s in zip(shape, strides)) if all(shape) else 0
    if storage_offset < 0 or storage_offset + extent > storage.numel:
        raise CheckpointError(
            f"a tensor of shape {list(shape)} at offset {storage_offset} overruns its storage of "
            f"{storage.numel} elements"
        )
    # A view whose elements overlap (a stride of 0, or strides smaller than the dimensions they
    # step over) would read one stored element many times: a 22 KB file of such views became 1.23 GB
    # of weights. torch.save writes views of real parameters, which never overlap.
    step = 1
    for s, d in sorted((s, d) for d, s in zip(shape, strides) if d > 1 and all(shape)):
        if s < step:
            raise CheckpointError(
                f"a tensor of shape {list(shape)} with strides {list(strides)} is a view whose elements overlap "
                "(stride 0 or overlapping strides); checkpoints store each weight element once"
            )
        step = s * d
    return TensorRef(storage, int(storage_offset), shape, strides)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    """Knows tensors and storages, plain containers and scalars; refuses every other global."""

    def __init__(self, file: Any, source: str, storages: dict[str, _StorageRef]):
        super().__init__(file)
        self.source = source
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _Marker(name)
        raise CheckpointError(
            f"{self.source}: the pickle asks for {module}.{name}; only tensors, storages and plain "
            "containers are read from torch files (no pickled code is ever run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Marker)):
            raise CheckpointError(f"{self.source}: unsupported persistent id in the pickle: {bounded_repr(pid)}")
        _, marker, key, _location, numel = pid[:5]
        if not isinstance(key, str) or type(numel) is not int or numel < 0 or len(key) > 256:
            raise CheckpointError(
                f"{self.source}: a storage in the pickle has key {bounded_repr(key)} and size {bounded_repr(numel)}; "
                "expected a short string and a non-negative integer"
            )
        dtype = STORAGE_DTYPES[marker.name]
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, dtype, int(numel))
        elif ref.dtype != dtype:
            raise CheckpointError(f"{self.source}: storage {key} is used as {ref.dtype} and as {dtype}")
        return ref


# Opcodes that store into or read from the unpickler's memo, an array the C unpickler grows to the
# index it is given: one LONG_BINPUT of 2**30 in a 6 KB pickle asked for 8 GB.
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
# Nesting allowed in a pickle. Through the memo one object can appear twice at every level, so
# hashing (a dict key) or printing an object n levels deep costs 2**n: a 333-byte pickle whose dict
# key nests 40 levels never finished unpickling. A state dict nests about 6 levels; a metaseq cfg 10.
MAX_PICKLE_DEPTH = 32


def _scan(f: Any, path: Path) -> None:
    """Walk one pickle's opcodes (pickletools, which builds nothing) simulating only how deep each
    stack entry nests, and refuse memo slots ahead of the opcodes and nesting beyond
    `MAX_PICKLE_DEPTH` before the real unpickler runs.

    Raises:
        CheckpointError: naming the file and the limit. pickle.UnpicklingError: malformed.
    """
    stack: list[int | None] = []  # nesting depth of each stack entry; None is a MARK
    memo: dict[int, int] = {}
    ops = 0
    for op, arg, _pos in pickletools.genops(f):
        ops += 1
        if op.name in _MEMO_PUT or op.name in _MEMO_GET:
            if not isinstance(arg, int) or arg > ops:
                raise CheckpointError(
                    f"{path}: the pickle uses memo slot {bounded_repr(arg)} after {ops} opcodes; a pickle numbers "
                    "its memo from 0 as it goes, so this is not one torch.save wrote"
                )
            if op.name in _MEMO_PUT:
                memo[arg] = stack[-1] or 0
            else:
                stack.append(memo.get(arg, 0))
            continue
        if op.name == "MEMOIZE":
            memo[len(memo)] = stack[-1] or 0
            continue
        before = op.stack_before
        popped: list[int] = []
        if pickletools.markobject in before:
            while stack and stack[-1] is not None:
                popped.append(stack.pop())  # type: ignore[arg-type]
            if not stack:
                raise pickle.UnpicklingError("MARK missing")
            stack.pop()
            below = before.index(pickletools.markobject)
        else:
            below = len(before)
        for _ in range(below):
            if not stack or stack[-1] is None:
                raise pickle.UnpicklingError("stack underflow")
            popped.append(stack.pop())  # type: ignore[arg-type]
        depth = 1 + max(popped) if popped else 0
        if depth > MAX_PICKLE_DEPTH:
            raise CheckpointError(
                f"{path}: the pickle nests objects more than {MAX_PICKLE_DEPTH} levels deep "
                "(opt_core.formats.torch_bin.MAX_PICKLE_DEPTH); a state dict nests a few"
            )
        stack += [None if item is pickletools.markobject else depth for item in op.stack_after]


def _load(f: Any, path: Path, storages: dict[str, _StorageRef]) -> Any:
    """One pickle from `f` (at its position) through the restricted unpickler, after `_scan`."""
    start = f.tell()
    try:
        _scan(f, path)
    except CheckpointError:
        raise
    except Exception:  # malformed: reported by the callers as any unpicklable file
        raise pickle.UnpicklingError("malformed pickle") from None
    f.seek(start)
    return _Unpickler(f, str(path), storages).load()


def _local_data_offset(f: Any, info: zipfile.ZipInfo, source: Path) -> int:
    """Where the bytes of a stored zip member start (after its local header)."""
    if info.header_offset < 0:
        raise CheckpointError(f"{source}: corrupt zip entry {bounded_repr(info.filename, 120)}")
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{source}: corrupt zip entry {bounded_repr(info.filename, 120)}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _naming(e: CheckpointError, path: Path) -> CheckpointError:
    """`e`, its message prefixed with the file when it does not name it (the tensor and storage
    checks run inside the unpickler, which knows no file)."""
    return e if str(path) in str(e) else CheckpointError(f"{path}: {e}")


def _problem(e: Exception) -> str:
    """What went wrong while unpickling, without the exception's text: pickle's own messages quote
    bytes of the file ("invalid load key, 'r'"), which may not be a pickle at all."""
    if isinstance(e, (pickle.UnpicklingError, EOFError)):
        return "not a valid pickle, or a truncated one"
    if isinstance(e, MemoryError):
        return "it asks for more memory than there is"
    return f"the pickle's contents are not a state dict ({type(e).__name__})"


# What zipfile raises on a damaged archive (bad offsets, unknown versions, CRC mismatches).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, NotImplementedError, EOFError, RuntimeError,
               struct.error, ValueError, OverflowError)


def _load_zip(f: Any, path: Path, size: int, storages: dict[str, _StorageRef]) -> tuple[Any, list[_StorageRef]]:
    """`load_pickle` for the zip format (torch >= 1.6); zipfile's own errors propagate."""
    zf = zipfile.ZipFile(f)
    members = {i.filename: i for i in zf.infolist()}
    pkl = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{path} is a zip file but not a torch.save archive (no single data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    # A pickle larger than the whole file can only come from a compressed member (torch stores its
    # members raw): refused rather than inflated.
    if members[pkl[0]].file_size > min(_MAX_PICKLE, size):
        raise CheckpointError(
            f"{path}: its pickle claims {members[pkl[0]].file_size:,} bytes, more than the file's {size:,} "
            f"(or the {_MAX_PICKLE:,}-byte limit); refusing"
        )
    raw = zf.read(pkl[0])
    try:
        obj = _load(io.BytesIO(raw), path, storages)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot unpickle its state dict ({_problem(e)})") from None
    for ref in storages.values():
        info = members.get(f"{prefix}data/{ref.key}")
        if info is None:
            raise CheckpointError(f"{path} lacks the storage data/{ref.key} its pickle refers to")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: storage data/{ref.key} is compressed; torch files store them raw")
        if info.file_size != ref.numel * ref.dtype.itemsize:
            raise CheckpointError(
                f"{path}: storage data/{ref.key} holds {info.file_size} bytes, the pickle says "
                f"{ref.numel} x {ref.dtype}"
            )
        ref.offset = _local_data_offset(f, info, path)
        if ref.offset + info.file_size > size:
            raise CheckpointError(f"{path} is truncated inside storage data/{ref.key}")
    return obj, list(storages.values())


def load_pickle(path: Path) -> tuple[Any, list[_StorageRef]]:
    """Unpickle a `torch.save` file (zip or legacy) restrictedly: the object, with `TensorRef`s
    for tensors, and every storage with its file offset.

    Raises:
        CheckpointError: not a torch file, a refused global, storages missing or out of bounds.
    """
    storages: dict[str, _StorageRef] = {}
    # Buffered: the opcode scan and the legacy format's unpickler read a few bytes at a time.
    with io.BufferedReader(open_file(path)) as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        f.seek(0)
        if magic == b"PK\x03\x04" and not zipfile.is_zipfile(f):
            raise CheckpointError(
                f"{path} is a truncated or damaged zip archive ({size} bytes, no readable central directory at "
                "its end); torch.save files are zip archives: was the download or copy cut short?"
            )
        f.seek(0)
        if zipfile.is_zipfile(f):
            try:
                return _load_zip(f, path, size, storages)
            except CheckpointError as e:
                raise _naming(e, path) from None
            except _ZIP_ERRORS as e:
                # Not the library's message: zipfile's quote names and bytes from the archive.
                raise CheckpointError(f"{path} is a corrupt zip archive ({type(e).__name__})") from None
        # The legacy format: magic, protocol, system info, the object, the storage keys, storages.
        f.seek(0)
        try:
            header = [_load(f, path, {}) for _ in range(3)]
        except CheckpointError as e:
            raise _naming(e, path) from None
        except Exception:
            raise CheckpointError(f"{path} is neither a torch.save zip archive nor a legacy torch file") from None
        if header[0] != _LEGACY_MAGIC or not isinstance(header[2], dict):
            raise CheckpointError(f"{path} is not a torch.save file (bad magic number)")
        if not header[2].get("little_endian", True):
            raise CheckpointError(f"{path} was written on a big-endian machine; not supported")
        try:
            obj = _load(f, path, storages)
            keys = _load(f, path, {})
        except CheckpointError as e:
            raise _naming(e, path) from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot unpickle its state dict ({_problem(e)})") from None
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: corrupt legacy torch file (no storage key list)")
        pos = f.tell()
        for key in keys:
            ref = storages.get(str(key))
            f.seek(pos)
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is truncated before storage {key}")
            (numel,) = struct.unpack("<q", raw)
            if ref is None or numel != ref.numel:
                raise CheckpointError(f"{path}: storage {key} is not the one its pickle describes")
            ref.offset = pos + 8
            pos = ref.offset + numel * ref.dtype.itemsize
            if pos > size:
                raise CheckpointError(f"{path} is truncated inside storage {key}")
        unplaced = [r.key for r in storages.values() if r.offset < 0]
        if unplaced:
            raise CheckpointError(f"{path} lacks the storages {unplaced} its pickle refers to")
        return obj, list(storages.values())


def read_tensor(f: Any, path: Path, key: str, t: TensorRef, out: np.ndarray | None = None) -> np.ndarray:
    """The bytes of `t` from open file `f` as an array of its shape (into `out` when it fits)."""
    out = out_array(out, t.shape, t.dtype)
    if not out.size:
        return out
    item = t.dtype.itemsize
    contiguous = [1] * len(t.shape)
    for i in range(len(t.shape) - 2, -1, -1):
        contiguous[i] = contiguous[i + 1] * t.shape[i + 1]
    if all(s == c or d == 1 for s, c, d in zip(t.stride, contiguous, t.shape)):
        f.seek(t.storage.offset + t.storage_offset * item)
        read_exact(f, out.reshape(-1).view(np.uint8).data, path, key)
        return out
    # A strided view (rare in state dicts): read the span it covers, then gather.
    extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    span = np.empty(extent, dtype=t.dtype)
    f.seek(t.storage.offset + t.storage_offset * item)
    read_exact(f, span.view(np.uint8).data, path, key)
    view = np.lib.stride_tricks.as_strided(span, t.shape, tuple(s * item for s in t.stride))
    np.copyto(out, view)
    return out


def check_views(tensors: Mapping[str, TensorRef], path: Path) -> None:
    """Refuse names that together read a storage more than `_MAX_VIEWS_PER_STORAGE` times over.
    Names may share a storage (a tied head is the embedding again; through the pickle's memo even
    the same tensor object), but a thousand names for one tensor would make each read a copy.

    Raises:
        CheckpointError: naming the file and storage.
    """
    viewed: dict[int, int] = {}
    for t in tensors.values():
        n = viewed[id(t.storage)] = viewed.get(id(t.storage), 0) + math.prod(t.shape)
        if n > _MAX_VIEWS_PER_STORAGE * max(t.storage.numel, 1):
            raise CheckpointError(
                f"{path}: tensors view storage {bounded_repr(t.storage.key, 60)} ({t.storage.numel} elements) more "
                f"than {_MAX_VIEWS_PER_STORAGE} times its size; a checkpoint stores each weight once"
            )


def state_dict_of(obj: Any, path: Path) -> dict[str, TensorRef]:
    """The flat key -> tensor dict of a loaded torch file (a training wrapper's `state_dict` unwrapped).

    Raises:
        CheckpointError: not a dict of tensors.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = []
    for k, v in obj.items():
        if not isinstance(v, TensorRef) or not isinstance(k, str):
            bad.append(bounded_repr(k, 100))
            if len(bad) == 20:
                break
    if bad:
        raise CheckpointError(f"{path} holds entries that are not tensors: {', '.join(bad[:20])}")
    check_views(obj, path)
    return obj


class TorchBinReader(Reader):
    """`pytorch_model.bin`, sharded `.bin` with its index, or one `.bin` file."""

    fmt = "bin"

    def __init__(self, path: str | os.PathLike[str], config: Any = None, *, files: list[Path] | None = None,
                 weight_map: Mapping[str, str] | None = None):
        from opt_core.formats.safetensors import check_index

        path = Path(path)
        if files is None:
            files, weight_map = resolve_files(path, self.fmt)
        super().__init__(path, files)
        self._tensors: dict[str, TensorRef] = {}
        self._where: dict[str, Path] = {}
        for file in files:
            obj, _ = load_pickle(file)
            for key, t in state_dict_of(obj, file).items():
                if key in self._tensors:
                    raise CheckpointError(f"{key} is stored twice: in {self._where[key].name} and {file.name}")
                self._tensors[key] = t
                self._where[key] = file
        if weight_map is not None:
            check_index(path, weight_map, {k: p.name for k, p in self._where.items()})
        self._handles: dict[Path, Any] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self._tensors.items()}

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def where(self, key: str) -> str:
        return str(self._where[key])

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        path = self._where[key]
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open_file(path)
        return read_tensor(f, path, key, self._tensors[key], out)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}


# ---------------------------------------------------------------- writing
def _pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def state_dict_pickle(entries: list[tuple[str, str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The protocol-2 pickle `torch.save` writes for an ordered dict of contiguous tensors, each
    with a storage of its own: entries are (key, storage key, dtype, shape)."""
    out = [b"\x80\x02", b"ccollections\nOrderedDict\n)R", b"("]
    for key, storage_key, dtype, shape in entries:
        numel = int(np.prod(shape, dtype=np.int64))
        stride: list[int] = []
        step = 1
        for d in reversed(shape):
            stride.insert(0, step)
            step *= d
        pid = _pickle_tuple([_pickle_str("storage"), f"ctorch\n{_STORAGE_NAMES[dtype]}\n".encode(),
                             _pickle_str(storage_key), _pickle_str("cpu"), _pickle_int(numel)])
        args = _pickle_tuple([
            pid + b"Q", _pickle_int(0), _pickle_tuple([_pickle_int(d) for d in shape]),
            _pickle_tuple([_pickle_int(s) for s in stride]), b"\x89", b"ccollections\nOrderedDict\n)R",
        ])
        out += [_pickle_str(key), b"ctorch._utils\n_rebuild_tensor_v2\n", args, b"R"]
    out += [b"u", b"."]
    return b"".join(out)


class _StreamingTorchFile:
    """One `torch.save`-compatible zip archive written tensor by tensor with `zipfile`."""

    def __init__(self, path: Path):
        self.path = path
        self.archive = path.name.lstrip(".").split(".")[0] or "archive"
        self._file = open(path, "wb")  # noqa: SIM115 (closed in finish/close)
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._entries: list[tuple[str, str, np.dtype, tuple[int, ...]]] = []

    def _member(self, name: str, size: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self.archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        # Pad the local header's extra field so the data starts 64-byte aligned (as torch.save does,
        # for memory-mapped loading); zipfile appends a 20-byte zip64 field to it when forced.
        start = self._file.tell() + 30 + len(info.filename.encode()) + 20 + 4
        pad = -start % _ALIGN
        info.extra = struct.pack("<HH", 0xF5F5, pad) + b"\0" * pad
        return info

    def _write(self, name: str, data: Any, size: int) -> None:
        with self._zip.open(self._member(name, size), "w", force_zip64=True) as w:
            w.write(data)

    def add(self, key: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype not in _STORAGE_NAMES:
            raise CheckpointError(f"cannot write {key} as {array.dtype} to pytorch_model.bin")
        storage_key = str(len(self._entries))
        self._write(f"data/{storage_key}", array.reshape(-1).view(np.uint8).data, array.nbytes)
        self._entries.append((key, storage_key, array.dtype, tuple(array.shape)))

    def finish(self) -> None:
        data = state_dict_pickle(self._entries)
        self._write("data.pkl", data, len(data))
        self._write("byteorder", b"little", 6)
        self._write("version", b"3\n", 2)
        self._zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        try:
            self._zip.close()
        except Exception:  # aborting half-way: the file is deleted anyway
            pass
        self._file.close()


class TorchBinWriter(Writer):
    """Writes `pytorch_model.bin`, or shards of at most `shard_bytes` plus the index, in the zip
    format `torch.save` produces. Memory: one tensor."""

    fmt = "bin"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        limit = self.shard_bytes if self.shard_bytes else 1 << 62
        self._shards = plan_shards({p.spec.name: p.nbytes for p in self.plan}, limit)
        self._names = shard_file_names(TORCH_BIN, len(self._shards))
        self._shard_of = {c: i for i, shard in enumerate(self._shards) for c in shard}
        self._files: dict[int, _StreamingTorchFile] = {}
        self._left = [len(s) for s in self._shards]

    def write(self, name: str, array: np.ndarray) -> None:
        plan = self._check(name, array)
        i = self._shard_of[name]
        if i not in self._files:
            self._files[i] = _StreamingTorchFile(tmp_name(self.folder, self._names[i]))
        self._files[i].add(plan.key, array)
        self._left[i] -= 1
        if self._left[i] == 0:
            self._files.pop(i).finish()

    def commit(self) -> list[Path]:
        self._require_complete()
        out = []
        for name in self._names:
            final_permissions(tmp_name(self.folder, name))
            os.replace(tmp_name(self.folder, name), self.folder / name)
            out.append(self.folder / name)
        if len(self._shards) > 1:
            weight_map = {self._by_name[c].key: n for shard, n in zip(self._shards, self._names) for c in shard}
            index = self.folder / (TORCH_BIN + ".index.json")
            write_index(index, weight_map, sum(p.nbytes for p in self.plan))
            out.append(index)
        return out

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        super().abort()
