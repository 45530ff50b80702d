"""The reader/writer interface every checkpoint format implements, and dtype handling.

A reader exposes a checkpoint as Hugging Face torch keys (either prefix variant) with shapes in the
canonical (torch) layout, one tensor at a time; a writer takes canonical tensors by canonical name
and stores them in its format. Layout and name translation live inside each format's module, so
the converter only ever sees the canonical table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from opt_core.checkpoint import CheckpointError
from opt_core.config import OPTConfig
from opt_core.params import Head, ParamSpec

# Short dtype names accepted everywhere (CLI, API), and what they mean.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}
_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
            "bf16": "bfloat16", "fp64": "float64", "f64": "float64"}


def resolve_dtype(dtype: str | np.dtype | None) -> np.dtype | None:
    """A NumPy dtype from a name ("fp16", "bfloat16", ...) or dtype; None stays None.

    Raises:
        ValueError: an unknown name.
    """
    if dtype is None:
        return None
    if isinstance(dtype, np.dtype):
        return dtype
    name = str(dtype).strip().lower()
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


def cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """`x` in `dtype` (no copy when it already is); round-to-nearest-even, as torch does."""
    if dtype is None or x.dtype == dtype:
        return x
    return x.astype(dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when `a` and `b` have the same dtype, shape and bytes (NaNs with equal payloads match)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# ---------------------------------------------------------------- interface
class Reader:
    """A checkpoint opened for reading, one tensor at a time.

    Attributes:
        source: a human-readable description (the folder or file) for error messages.
        files: every file the reader reads (the converter never writes over them).
        config: the config found next to the weights (config.json or a metaseq cfg), or None.
        fmt: the format name ("safetensors", "bin", "tf-h5", "flax-msgpack", "metaseq").
    """

    fmt = "?"

    def __init__(self, source: str | os.PathLike[str], files: Iterable[Path]):
        self.source = str(source)
        self.files = [Path(f) for f in files]
        self.config: OPTConfig | None = None
        # The model's config, for formats whose layout depends on it (TF/Flax store identity biases
        # for no-bias configs); set by the converter before `shapes()`.
        self.layout_config: OPTConfig | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key (HF torch name, with or without `model.`) -> canonical (torch-layout) shape."""
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype of `key`."""
        raise NotImplementedError

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `key` in canonical layout and its stored dtype: a fresh array the caller
        owns, or `out` (shape and dtype of the tensor) filled in, for readers that can."""
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shapes()[key], dtype=np.int64)) * self.dtype(key).itemsize

    def close(self) -> None:
        """Release open files; safe to call twice."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameworkFileReader(Reader):
    """A folder holding one Hugging Face TF or Flax weight file (or the file itself), read through
    the streaming reader `opt_core.formats` has for it (`reader_class`), opened once. The converter
    sets `layout_config` before calling `shapes()`: with it, the identity biases/scales Hugging Face
    TF and Flax store for no-bias / no-affine configs are hidden, and verified before the first
    tensor is read."""

    file_name = "?"
    reader_class: Callable[[Path, OPTConfig | None], Any]

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None):
        path = Path(path)
        file = path if path.is_file() else path / self.file_name
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {self.file_name}")
        super().__init__(path, [file])
        self._file = file
        self.layout_config = config
        self._reader: Any = None
        self._checked = False

    def _open(self) -> Any:
        if self._reader is not None and self._reader.config is not self.layout_config:
            self.close()  # opened before the converter set the config: hide the extras now
        if self._reader is None:
            self._reader = self.reader_class(self._file, self.layout_config)
        return self._reader

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._open().shapes()

    def dtype(self, key: str) -> np.dtype:
        return self._open().dtype(key)

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        reader = self._open()
        if not self._checked:
            reader.check_identity_extras()
            self._checked = True
        return reader.read(key, out)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@dataclass(frozen=True)
class TensorPlan:
    """One tensor a writer will receive: canonical spec, the HF torch key it is stored under, dtype."""

    spec: ParamSpec
    key: str
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return self.spec.numel * self.dtype.itemsize


class Writer:
    """Writes one format into `folder` (an empty temporary folder the converter owns).

    Files are written under temporary names and renamed by `commit`; `abort` removes everything
    written so far. Tensors arrive through `write` in the plan's order, in canonical layout and in
    the planned dtype.
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
        (HDF5 groups, msgpack trees) pull through `fetch` in theirs."""
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

    def reuses_fetched_arrays(self) -> bool:
        """Whether every array from `fetch` is consumed before the next fetch, so the converter may
        read each tensor into the same buffer. True for every writer here unless it says otherwise."""
        return True

    def _require_complete(self) -> None:
        missing = [p.spec.name for p in self.plan if p.spec.name not in self._written]
        if missing:
            raise CheckpointError(f"{self.fmt} writer: planned tensors never written: {', '.join(missing)}")


def tmp_name(folder: Path, name: str) -> Path:
    """The temporary name a writer uses for `name` until `commit`."""
    return folder / f".{name}.tmp"


class LazyTensors(Mapping[str, np.ndarray]):
    """A read-only mapping canonical name -> tensor that fetches each tensor only when indexed, for
    writers that take a mapping (`write_tf_h5`) and pull tensors in their own order. `in` and
    iteration never fetch."""

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
