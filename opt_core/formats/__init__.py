"""Every checkpoint format, framework-free: one reader and one writer per format over `base`.

    opt_core/formats/
      base.py          Reader / Writer / TensorPlan, dtypes, file checks (regular files, shard names)
      files.py         Hugging Face file names, format detection, shard indexes, shard planning
      safetensors.py   own header parser (strict), plain reads, `get_slice`; streaming writer
      torch_bin.py     restricted unpickler (zip and legacy files, no torch, no code run); stdlib writer
      tf_h5.py         h5py; the one place TF variable paths live; links/external storage refused
      flax_msgpack.py  bounded msgpack parser; the one place Flax paths live; byte-exact writer
      metaseq.py       model-parallel parts merged on read (read only)
      _transpose.py    fast bit-exact transposes and a reusable scratch buffer

`open_reader(path, fmt, config)` resolves the files once and opens the reader once, with the config
(TF/Flax layouts depend on it). Loaders and the converter go through `opt_core.checkpoint`'s
`open_checkpoint`, which adds key accounting and the checks every load makes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from opt_core.config import OPTConfig
from opt_core.formats._transpose import Scratch, fast_transpose
from opt_core.formats.base import (
    DTYPES,
    CheckpointError,
    LazyTensors,
    Reader,
    TensorPlan,
    TensorSlice,
    Writer,
    cast,
    dtype_name,
    resolve_dtype,
    same_bits,
)
from opt_core.formats.files import READ_FORMATS, WRITE_FORMATS, detect_format, resolve_files


def reader_class(fmt: str) -> Callable[..., Reader]:
    """The reader of format `fmt`."""
    if fmt == "safetensors":
        from opt_core.formats.safetensors import SafetensorsReader

        return SafetensorsReader
    if fmt == "bin":
        from opt_core.formats.torch_bin import TorchBinReader

        return TorchBinReader
    if fmt == "tf-h5":
        from opt_core.formats.tf_h5 import TFH5Reader

        return TFH5Reader
    if fmt == "flax-msgpack":
        from opt_core.formats.flax_msgpack import FlaxMsgpackReader

        return FlaxMsgpackReader
    if fmt == "metaseq":
        from opt_core.formats.metaseq import MetaseqReader

        return MetaseqReader
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(READ_FORMATS)}")


def open_reader(path: str | os.PathLike[str], fmt: str | None = None, config: OPTConfig | None = None) -> Reader:
    """Open the checkpoint at `path` (a folder or one weight file) in format `fmt` (detected when
    None), resolving its files once. `config` lets TF/Flax readers hide the identity tensors those
    formats store for no-bias / no-affine models (their values are verified on the first read).

    Raises:
        FileNotFoundError: nothing readable there. CheckpointError: a hostile or corrupt file.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    cls = reader_class(fmt)
    files, weight_map = resolve_files(path, fmt)
    return cls(path, config, files=files, weight_map=weight_map)


def writer_class(fmt: str) -> type[Writer]:
    """The writer of output format `fmt`."""
    if fmt == "safetensors":
        from opt_core.formats.safetensors import SafetensorsWriter

        return SafetensorsWriter
    if fmt == "bin":
        from opt_core.formats.torch_bin import TorchBinWriter

        return TorchBinWriter
    if fmt == "tf-h5":
        from opt_core.formats.tf_h5 import TFH5Writer

        return TFH5Writer
    if fmt == "flax-msgpack":
        from opt_core.formats.flax_msgpack import FlaxMsgpackWriter

        return FlaxMsgpackWriter
    raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)}")


__all__ = [
    "DTYPES",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "CheckpointError",
    "LazyTensors",
    "Reader",
    "Scratch",
    "TensorPlan",
    "TensorSlice",
    "Writer",
    "cast",
    "detect_format",
    "dtype_name",
    "fast_transpose",
    "open_reader",
    "reader_class",
    "resolve_dtype",
    "same_bits",
    "writer_class",
]
