"""Checkpoint formats the converter reads and writes, behind one small interface (`base`)."""

from __future__ import annotations

import os
from pathlib import Path

from conversion.formats.base import (
    DTYPES,
    LazyTensors,
    Reader,
    TensorPlan,
    Writer,
    cast,
    dtype_name,
    resolve_dtype,
    same_bits,
)
from opt_core.checkpoint import FORMATS, formats_present

# Formats the converter writes (`--to`), and those it reads (`--from`; metaseq is read-only).
WRITE_FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")
READ_FORMATS = (*WRITE_FORMATS, "metaseq")
_SUFFIXES = {".safetensors": "safetensors", ".bin": "bin", ".h5": "tf-h5", ".msgpack": "flax-msgpack", ".pt": "metaseq"}


def detect_source_format(path: str | os.PathLike[str]) -> str:
    """The format of a checkpoint folder or file: a HF folder's preferred format (safetensors, bin,
    tf-h5, flax-msgpack, in that order), else metaseq part files.

    Raises:
        FileNotFoundError: nothing readable at `path`.
    """
    from conversion.formats.metaseq import is_metaseq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        fmt = _SUFFIXES.get(path.suffix)
        if fmt is None:
            raise FileNotFoundError(
                f"cannot tell the format of {path} from its suffix; expected one of {sorted(_SUFFIXES)}"
            )
        return fmt
    present = formats_present(path)
    if present:
        return present[0]
    if is_metaseq(path):
        return "metaseq"
    names = ", ".join(f for single, index in FORMATS.values() for f in (single, index) if f)
    raise FileNotFoundError(f"{path} holds no OPT checkpoint (looked for {names}, *model_part-N.pt, consolidated.pt)")


def open_reader(path: str | os.PathLike[str], fmt: str | None = None) -> Reader:
    """Open a checkpoint for reading in format `fmt` (detected when None)."""
    fmt = fmt or detect_source_format(path)
    if fmt == "safetensors":
        from conversion.formats.safetensors_format import SafetensorsReader

        return SafetensorsReader(path)
    if fmt == "bin":
        from conversion.formats.torch_bin import TorchBinReader

        return TorchBinReader(path)
    if fmt == "tf-h5":
        from conversion.formats.tf_h5_format import TfH5Reader

        return TfH5Reader(path)
    if fmt == "flax-msgpack":
        from conversion.formats.flax_msgpack_format import FlaxMsgpackReader

        return FlaxMsgpackReader(path)
    if fmt == "metaseq":
        from conversion.formats.metaseq import MetaseqReader

        return MetaseqReader(path)
    raise ValueError(f"unknown source format {fmt!r}; expected one of {', '.join(READ_FORMATS)}")


def writer_class(fmt: str) -> type[Writer]:
    """The writer of output format `fmt`."""
    if fmt == "safetensors":
        from conversion.formats.safetensors_format import SafetensorsWriter

        return SafetensorsWriter
    if fmt == "bin":
        from conversion.formats.torch_bin import TorchBinWriter

        return TorchBinWriter
    if fmt == "tf-h5":
        from conversion.formats.tf_h5_format import TfH5Writer

        return TfH5Writer
    if fmt == "flax-msgpack":
        from conversion.formats.flax_msgpack_format import FlaxMsgpackWriter

        return FlaxMsgpackWriter
    raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(WRITE_FORMATS)}")


__all__ = [
    "DTYPES",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "LazyTensors",
    "Reader",
    "TensorPlan",
    "Writer",
    "cast",
    "detect_source_format",
    "dtype_name",
    "open_reader",
    "resolve_dtype",
    "same_bits",
    "writer_class",
]
