"""Hugging Face `pytorch_model.bin`, single file or sharded with `pytorch_model.bin.index.json`.

Read with `torch.load(weights_only=True, mmap=True)` (never full unpickling): tensors stay in the
file until asked for, and after each tensor is copied out its pages are handed back to the kernel
(`madvise(MADV_DONTNEED)` on the private, never-written mapping), so resident memory stays near one
tensor instead of growing to the file size.

Writing streams too: the writer produces the same zip archive `torch.save` does, but writes each
tensor's bytes as it arrives and the pickled state dict (which only references them) last, so it
never holds more than one tensor.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from conversion.formats.base import Reader, Writer, tmp_name
from opt_core.checkpoint import (
    TORCH_BIN,
    TORCH_BIN_INDEX,
    CheckpointError,
    plan_shards,
    read_index,
    shard_file_names,
    write_index,
)

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux/glibc: pages are simply left to the kernel
    _madvise = None


def torch_to_numpy(t) -> np.ndarray:
    """A NumPy copy of a CPU torch tensor (bfloat16 through ml_dtypes)."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def numpy_to_torch(x: np.ndarray):
    """A torch tensor sharing `x`'s memory (bfloat16 through a bit view)."""
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def release_pages(t) -> None:
    """Drop the resident pages behind a memory-mapped, read-only tensor (re-read from disk if touched
    again). A no-op where madvise is unavailable."""
    if _madvise is None:
        return
    nbytes = t.untyped_storage().nbytes()
    if nbytes < _PAGE:
        return
    start = t.untyped_storage().data_ptr()
    lo = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside this storage
    hi = (start + nbytes) // _PAGE * _PAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)


def load_torch_file(path: Path) -> tuple[dict, bool]:
    """`torch.load(weights_only=True)` of one file, memory-mapped where the file allows.

    Returns the loaded object and whether it is memory-mapped.

    Raises:
        CheckpointError: the file is not a loadable torch pickle or needs full unpickling.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e).lower():
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    except Exception as e:  # UnpicklingError for pickles that need arbitrary code, EOFError, ...
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {str(e)[:500]}") from None
    try:  # the legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {str(e)[:500]}") from None


def _state_dict(obj: object, path: Path) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a training checkpoint's wrapper
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    import torch

    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} holds entries that are not tensors: {', '.join(map(str, bad[:20]))}")
    return obj


class TorchBinReader(Reader):
    """A `pytorch_model.bin` folder (single or sharded) or a single `.bin` file."""

    fmt = "bin"

    def __init__(self, path: str | os.PathLike[str]):
        path = Path(path)
        weight_map = None
        if path.is_file():
            files = [path]
        elif (path / TORCH_BIN_INDEX).is_file():
            weight_map = read_index(path / TORCH_BIN_INDEX)
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path / TORCH_BIN_INDEX} names shards that do not exist: {missing}")
            files = [path / s for s in shards]
        elif (path / TORCH_BIN).is_file():
            files = [path / TORCH_BIN]
        else:
            raise FileNotFoundError(f"{path} holds no {TORCH_BIN} or {TORCH_BIN_INDEX}")
        super().__init__(path, files)
        self._tensors: dict[str, object] = {}
        self._where: dict[str, Path] = {}
        self._mapped = True
        for file in files:
            obj, mapped = load_torch_file(file)
            self._mapped &= mapped
            for key, t in _state_dict(obj, file).items():
                if key in self._tensors:
                    raise CheckpointError(f"{key} is stored twice: in {self._where[key].name} and {file.name}")
                self._tensors[key] = t
                self._where[key] = file
        if weight_map is not None:
            absent = [k for k in weight_map if k not in self._tensors]
            wrong = [k for k, v in weight_map.items() if k in self._where and self._where[k].name != v]
            unlisted = [k for k in self._tensors if k not in weight_map]
            if absent or wrong or unlisted:
                raise CheckpointError(
                    f"{path / TORCH_BIN_INDEX} disagrees with its shards: listed but absent {absent}, "
                    f"in another shard {wrong}, not listed {unlisted}"
                )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(t.shape) for k, t in self._tensors.items()}  # type: ignore[attr-defined]

    def dtype(self, key: str) -> np.dtype:
        import torch

        t = self._tensors[key]
        if t.dtype == torch.bfloat16:  # type: ignore[attr-defined]
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)  # type: ignore[attr-defined]

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        t = self._tensors[key]
        out = torch_to_numpy(t)
        if self._mapped:
            release_pages(t)
        return out

    def close(self) -> None:
        self._tensors = {}


class _StorageRef:
    """Stands for a storage already written to the archive; pickled as a persistent id."""

    def __init__(self, key: str, storage_type: object, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorRef:
    """Pickles exactly as a contiguous CPU tensor over a `_StorageRef` does under `torch.save`."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int):
        import collections

        import torch

        stride, step = [], 1
        for d in reversed(self.shape):  # C-contiguous strides, in elements
            stride.insert(0, step)
            step *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


def _storage_type(dtype: np.dtype):
    import torch

    names = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
             "float64": "DoubleStorage"}
    if dtype.name not in names:
        raise CheckpointError(f"cannot write {dtype} tensors to pytorch_model.bin")
    return getattr(torch, names[dtype.name])


class _StreamingTorchFile:
    """One `torch.save`-compatible zip archive written tensor by tensor: each tensor's bytes go to
    `data/{i}` as it arrives; the pickled state dict, which only references them, comes last."""

    def __init__(self, path: Path):
        import torch
        from torch.serialization import _get_storage_alignment

        self.path = path
        self._zip = torch._C.PyTorchFileWriter(str(path), True, _get_storage_alignment())
        self._entries: dict[str, _TensorRef] = {}

    def add(self, key: str, array: np.ndarray) -> None:
        i = str(len(self._entries))
        tensor = numpy_to_torch(array)  # shares `array`'s memory
        self._zip.write_record(f"data/{i}", tensor.untyped_storage(), tensor.untyped_storage().nbytes())
        ref = _StorageRef(i, _storage_type(array.dtype), int(array.size))
        self._entries[key] = _TensorRef(ref, tuple(array.shape))

    def finish(self) -> None:
        import collections
        import io
        import pickle
        import sys

        from torch.serialization import _get_storage_alignment

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _StorageRef):
                    return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(collections.OrderedDict(self._entries))  # torch.save's default protocol
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(_get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        self._zip = None


class TorchBinWriter(Writer):
    """Writes `pytorch_model.bin`, or shards of at most `shard_bytes` plus the index, in the zip
    format `torch.save` produces (loadable with `torch.load(weights_only=True, mmap=True)`).

    Streams: each tensor's bytes are written to the archive as they arrive and the state dict's
    pickle, which only references them, is written when the shard is complete. Memory: one tensor.
    """

    fmt = "bin"

    def __init__(self, *args, **kwargs):
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
        self._files[i].add(plan.key, np.ascontiguousarray(array))
        self._left[i] -= 1
        if self._left[i] == 0:
            self._files.pop(i).finish()

    def commit(self) -> list[Path]:
        self._require_complete()
        out = []
        for name in self._names:
            os.replace(tmp_name(self.folder, name), self.folder / name)
            out.append(self.folder / name)
        if len(self._shards) > 1:
            weight_map = {self._by_name[c].key: n for shard, n in zip(self._shards, self._names) for c in shard}
            write_index(self.folder / TORCH_BIN_INDEX, weight_map, sum(p.nbytes for p in self.plan))
            out.append(self.folder / TORCH_BIN_INDEX)
        return out

    def abort(self) -> None:
        self._files = {}  # the zip writers close when collected; their temp files are removed below
        import gc

        gc.collect()
        super().abort()
