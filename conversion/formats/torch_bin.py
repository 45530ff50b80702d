"""Hugging Face `pytorch_model.bin`, single file or sharded with `pytorch_model.bin.index.json`.

Read with `torch.load(weights_only=True, mmap=True)` (never full unpickling): tensors stay in the
file until asked for, and after each tensor is copied out its pages are handed back to the kernel
(`madvise(MADV_DONTNEED)` on the private, never-written mapping), so resident memory stays near one
tensor instead of growing to the file size.

Writing cannot stream: `torch.save` pickles a whole state dict at once, so the writer holds one
shard (at most `shard_bytes`, or the whole model when unsharded) before saving it.
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

    def read(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        out = torch_to_numpy(t)
        if self._mapped:
            release_pages(t)
        return out

    def close(self) -> None:
        self._tensors = {}


class TorchBinWriter(Writer):
    """Writes `pytorch_model.bin`, or shards of at most `shard_bytes` plus the index.

    Memory: one shard (`torch.save` needs the shard's whole state dict); unsharded, the whole model.
    """

    fmt = "bin"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limit = self.shard_bytes if self.shard_bytes else 1 << 62
        self._shards = plan_shards({p.spec.name: p.nbytes for p in self.plan}, limit)
        self._names = shard_file_names(TORCH_BIN, len(self._shards))
        self._shard_of = {c: i for i, shard in enumerate(self._shards) for c in shard}
        self._pending: dict[int, dict] = {}
        self._done: list[int] = []

    def write(self, name: str, array: np.ndarray) -> None:
        import torch

        plan = self._check(name, array)
        i = self._shard_of[name]
        # clone: the saved storage must be the tensor's own, not a view into a larger buffer
        self._pending.setdefault(i, {})[plan.key] = numpy_to_torch(array).clone()
        if len(self._pending[i]) == len(self._shards[i]):
            torch.save(self._pending.pop(i), tmp_name(self.folder, self._names[i]))
            self._done.append(i)

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
        self._pending = {}
        super().abort()
