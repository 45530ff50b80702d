"""What every checkpoint format shares: the reader and writer interface, dtypes, and the checks on
files handed to us (plain files only, shard names inside their folder).

A `Reader` exposes a checkpoint as Hugging Face torch keys (either prefix variant) with shapes in
the canonical (torch) layout, one tensor at a time; a `Writer` takes canonical tensors by canonical
name and stores them in its format. Layout and name translation live inside each format's module,
so loaders and the converter only ever see the canonical table.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from opt_core.config import OPTConfig
from opt_core.params import Head, ParamSpec
from opt_core.safe_files import bounded_repr, check_inside, check_regular, open_regular


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names files, keys and shapes."""


# ---------------------------------------------------------------- dtypes
# Short dtype names accepted everywhere (CLI, API), and what they mean.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}
_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
            "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "float": "float32", "double": "float64"}


def resolve_dtype(dtype: str | np.dtype | None) -> np.dtype | None:
    """A NumPy dtype from a name ("fp16", "bfloat16", "torch.float16", ...) or dtype; None stays None.

    Raises:
        ValueError: an unknown name.
    """
    if dtype is None:
        return None
    if isinstance(dtype, np.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.").removeprefix("<dtype: '").removesuffix("'>")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of fp32, fp16, bf16 (or float32, float16, bfloat16)")
    return DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    """"float32", "float16", "bfloat16", ... (the torch_dtype spelling of config.json)."""
    dtype = np.dtype(dtype)
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return dtype.name


def is_float(dtype: np.dtype) -> bool:
    """Whether checkpoint tensors of `dtype` may become weights (float16/32/64, bfloat16)."""
    return np.dtype(dtype) in DTYPES.values()


def cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """`x` in `dtype` (no copy when it already is); round-to-nearest-even, as torch does."""
    if dtype is None or x.dtype == dtype:
        return x
    return x.astype(dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when `a` and `b` have the same dtype, shape and bytes (NaNs with equal payloads match)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    fa = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    fb = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    step = 4 * _FINITE_CHUNK  # bytes per comparison: bounded temporaries, no copy of either array
    return all(np.array_equal(fa[i : i + step], fb[i : i + step]) for i in range(0, fa.size, step))


_FINITE_CHUNK = 1 << 20  # elements per pass: bounded temporary memory
# The exponent bits of each float type: all set means infinity or NaN.
# bytes per element -> (the unsigned view, the exponent bits: one mask, or one per 2-byte float type)
_EXPONENT: dict[int, tuple[type[np.unsignedinteger], int | dict[str, int]]] = {
    2: (np.uint16, {"float16": 0x7C00, "bfloat16": 0x7F80}), 4: (np.uint32, 0x7F800000),
    8: (np.uint64, 0x7FF0000000000000)}


def first_non_finite(x: np.ndarray) -> int | None:
    """The flat index of the first NaN or infinity in `x`, or None. Works in bounded memory, on the
    bits (a masked max per chunk: ten times faster than `np.isfinite` on float16)."""
    flat = x.reshape(-1)
    uint, masks = _EXPONENT.get(x.dtype.itemsize, (None, None))
    mask = masks.get(x.dtype.name) if isinstance(masks, dict) else masks
    if uint is None or mask is None or x.dtype.kind not in "fV":
        return _first_non_finite_slow(flat)
    bits = flat.view(uint)
    buf = np.empty(min(_FINITE_CHUNK, bits.size), dtype=uint)
    for start in range(0, bits.size, _FINITE_CHUNK):
        chunk = bits[start : start + _FINITE_CHUNK]
        part = buf[: chunk.size]
        np.bitwise_and(chunk, mask, out=part)
        if part.max() == mask:
            return start + int(np.argmax(part == mask))
    return None


def _first_non_finite_slow(flat: np.ndarray) -> int | None:
    for start in range(0, flat.size, _FINITE_CHUNK):
        ok = np.isfinite(flat[start : start + _FINITE_CHUNK])
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


# ---------------------------------------------------------------- files handed to us
def check_regular_file(path: Path) -> Path:
    """`path` if it is a regular file (symlinks followed, as in a Hugging Face cache), checked with
    `os.stat` before anything opens it.

    Raises:
        FileNotFoundError: nothing there.
        CheckpointError: a FIFO, device, socket or folder, which reading could block on or misread.
    """
    check_regular(path, CheckpointError)
    return path


def folder_file(folder: Path, name: str, what: str = "weight file") -> Path:
    """`folder / name`, a regular file whose real path stays inside `folder` (or is a Hugging Face
    cache blob of the same repo; see `opt_core.safe_files.check_inside`).

    Raises:
        FileNotFoundError: nothing there.
        CheckpointError: a link leaving the folder (naming link and target), or not a regular file.
    """
    path = folder / name
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} does not exist")
    check_inside(path, folder, CheckpointError, what)
    return check_regular_file(path)


def open_file(path: Path) -> Any:
    """`path` opened for unbuffered binary reading, refused (CheckpointError) unless it is a
    regular file, without blocking on a FIFO swapped in since it was checked."""
    return open_regular(path, CheckpointError)


def is_regular_file(path: Path) -> bool:
    """Whether `path` exists and is a regular file (no stat of a FIFO ever opens it)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def shard_path(folder: Path, name: object, index: Path) -> Path:
    """The shard `name` of index file `index`: a plain file name inside `folder`, nothing else.

    Raises:
        CheckpointError: a path with a separator, `..`, an absolute path or an empty name.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name)):
        raise CheckpointError(
            f"{index} names shard {bounded_repr(name, 120)}; shard entries must be plain file names inside {folder}"
        )
    return folder / name


# ---------------------------------------------------------------- reading
class TensorSlice:
    """Part of one tensor, read on indexing (`reader.get_slice(key)[rows, cols]`), in canonical
    layout. The base version reads the whole tensor; formats that can read a part do better."""

    def __init__(self, reader: Reader, key: str):
        self.reader, self.key = reader, key
        self.shape = reader.shapes()[key]
        self.dtype = reader.dtype(key)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.ascontiguousarray(self.reader.read(self.key)[index])


class Reader:
    """A checkpoint opened for reading, one tensor at a time.

    Attributes:
        fmt: the format name ("safetensors", "bin", "tf-h5", "flax-msgpack", "metaseq").
        source: a human-readable description (the folder or file) for error messages.
        files: every file the reader reads (the converter never writes over them).
        config: the config found inside the weights (a metaseq cfg), or None.
    """

    fmt = "?"
    reads_row_slices = False  # whether `get_slice(key)[a:b]` reads only rows a..b

    def __init__(self, source: str | os.PathLike[str], files: Iterable[Path]):
        self.source = str(source)
        self.files = [Path(f) for f in files]
        self.config: OPTConfig | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key (HF torch name, with or without `model.`) -> canonical (torch-layout) shape."""
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype of `key`."""
        raise NotImplementedError

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `key` in canonical layout and its stored dtype: a fresh array the caller
        owns, or `out` filled in when it is C-contiguous with the tensor's shape and dtype."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        """The file holding `key`, for error messages."""
        return str(self.files[0]) if len(self.files) == 1 else self.source

    def get_slice(self, key: str) -> TensorSlice:
        """A lazily read view of `key` (`[...]` reads only what it selects where the format allows)."""
        return TensorSlice(self, key)

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shapes()[key], dtype=np.int64)) * self.dtype(key).itemsize

    def check_identity_extras(self) -> None:
        """For TF/Flax files: verify the identity tensors hidden for no-bias configs (no-op here)."""

    def close(self) -> None:
        """Release open files; safe to call twice."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def out_array(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`out` when it can take a tensor of `shape` and `dtype` in place, else a new array."""
    if out is None or out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        return np.empty(shape, dtype=dtype)
    return out


def read_exact(f: Any, buffer: memoryview, path: Path | str, key: str) -> None:
    """Fill `buffer` from file `f` at its position, or raise naming the file and tensor."""
    got, n = 0, len(buffer)
    while got < n:
        k = f.readinto(buffer[got:])
        if not k:
            raise CheckpointError(f"{path} is truncated: {key} needs {n} bytes, the file ends after {got}")
        got += k


# ---------------------------------------------------------------- writing
@dataclass(frozen=True)
class TensorPlan:
    """One tensor a writer will receive: canonical spec, the HF torch key it is stored under, dtype."""

    spec: ParamSpec
    key: str
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return self.spec.numel * self.dtype.itemsize


def tmp_name(folder: Path, name: str) -> Path:
    """The temporary name a writer uses for `name` until `commit`."""
    return folder / f".{name}.tmp"


class Writer:
    """Writes one format into `folder`.

    Files are written under temporary names and renamed by `commit`; `abort` removes everything
    written so far. Tensors arrive through `write` (or are pulled by `write_all`) in canonical
    layout and in the planned dtype.
    """

    fmt = "?"
    # Whether the format can hold an `lm_head.weight` tied to the token embedding (TF/Flax cannot).
    stores_tied_lm_head = True

    def __init__(self, folder: Path, plan: list[TensorPlan], config: OPTConfig, head: Head,
                 shard_bytes: int | None = None):
        self.folder = Path(folder)
        self.plan = plan
        self.config = config
        self.head = head
        self.shard_bytes = shard_bytes
        self._by_name = {p.spec.name: p for p in plan}
        self._written: set[str] = set()

    def _check(self, name: str, array: np.ndarray) -> TensorPlan:
        plan = self._by_name.get(name)
        if plan is None:
            raise CheckpointError(f"writer got {name}, which is not in the conversion plan")
        if name in self._written:
            raise CheckpointError(f"writer got {name} twice")
        if tuple(array.shape) != plan.spec.shape or array.dtype != plan.dtype:
            raise CheckpointError(
                f"writer got {name} as {list(array.shape)} {array.dtype}, planned {list(plan.spec.shape)} {plan.dtype}"
            )
        self._written.add(name)
        return plan

    @classmethod
    def check_model(cls, config: OPTConfig, head: Head) -> None:
        """Raise ValueError when the format cannot hold this model (called before anything is written)."""

    def write(self, name: str, array: np.ndarray) -> None:
        """Store the canonical tensor `name`."""
        raise NotImplementedError

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        """Write every planned tensor, getting each from `fetch(canonical name)` when the writer
        needs it. Push writers take them in plan order; formats whose writer decides the order
        (HDF5 groups, msgpack trees) pull through `fetch` in theirs. Each array from `fetch` is
        consumed before the next fetch, so the caller may reuse one buffer."""
        for p in self.plan:
            self.write(p.spec.name, fetch(p.spec.name))

    def commit(self) -> list[Path]:
        """Finish every file and rename it to its final name; returns the final paths.

        Raises:
            CheckpointError: a planned tensor was never written.
        """
        raise NotImplementedError

    def abort(self) -> None:
        """Delete everything this writer wrote. Safe to call at any point, and twice."""
        for path in self.folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    def _require_complete(self) -> None:
        missing = [p.spec.name for p in self.plan if p.spec.name not in self._written]
        if missing:
            raise CheckpointError(f"{self.fmt} writer: planned tensors never written: {', '.join(missing)}")


class LazyTensors(Mapping[str, np.ndarray]):
    """A read-only mapping canonical name -> tensor that fetches each tensor only when indexed, for
    writers that take a mapping and pull tensors in their own order. `in` and iteration never fetch."""

    def __init__(self, names: Iterable[str], fetch: Callable[[str], np.ndarray]):
        self._names = list(names)
        self._set = set(self._names)
        self._fetch = fetch

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._set:
            raise KeyError(name)
        return self._fetch(name)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def final_permissions(path: Path) -> None:
    """Give a file written through a private temporary name the usual 0666 & ~umask mode
    (`tempfile`-style creation leaves 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
