"""Which files hold a checkpoint's weights: Hugging Face file names, format detection, shard
indexes (whose entries must be plain file names inside the folder) and shard planning.

Every loader and the converter resolve files here, once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from opt_core.formats.base import (
    CheckpointError,
    check_regular_file,
    final_permissions,
    folder_file,
    is_regular_file,
    shard_path,
)
from opt_core.safe_files import read_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TF_H5 = "tf_model.h5"
FLAX_MSGPACK = "flax_model.msgpack"
METASEQ_PART = re.compile(r"model_part-(\d+)\.pt$")
METASEQ_CONSOLIDATED = "consolidated.pt"

# Format name -> (single file, index file or None); the order is the load preference.
FORMATS: dict[str, tuple[str, str | None]] = {
    "safetensors": (SAFETENSORS, SAFETENSORS_INDEX),
    "bin": (TORCH_BIN, TORCH_BIN_INDEX),
    "tf-h5": (TF_H5, None),
    "flax-msgpack": (FLAX_MSGPACK, None),
}
# Formats written (`--to`), and those read (metaseq is read-only).
WRITE_FORMATS = tuple(FORMATS)
READ_FORMATS = (*WRITE_FORMATS, "metaseq")
SUFFIXES = {".safetensors": "safetensors", ".bin": "bin", ".h5": "tf-h5", ".msgpack": "flax-msgpack", ".pt": "metaseq"}

DEFAULT_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default max_shard_size ("5GB")


def formats_present(folder: str | os.PathLike[str]) -> list[str]:
    """Hugging Face weight formats found in `folder`, in load-preference order."""
    folder = Path(folder)
    return [
        fmt
        for fmt, (single, index) in FORMATS.items()
        if (folder / single).exists() or (index is not None and (folder / index).exists())
    ]


def metaseq_parts(path: Path) -> list[Path]:
    """The model-parallel part files of a metaseq checkpoint folder (or the `.pt` file itself).

    Raises:
        FileNotFoundError: no part files; CheckpointError: part numbers with gaps or duplicates.
    """
    if not path.is_dir():
        return [check_regular_file(path)]
    parts: dict[int, list[Path]] = {}
    for f in path.iterdir():
        m = METASEQ_PART.search(f.name)
        if m:
            parts.setdefault(int(m.group(1)), []).append(f)
    if parts:
        dup = {i: [f.name for f in fs] for i, fs in parts.items() if len(fs) > 1}
        if dup:
            raise CheckpointError(f"{path} holds several files for the same model-parallel part: {dup}")
        numbers = sorted(parts)
        if numbers != list(range(len(numbers))):
            raise CheckpointError(f"{path}: model-parallel parts {numbers} are not numbered 0..{len(numbers) - 1}")
        return [folder_file(path, parts[i][0].name, "metaseq part") for i in numbers]
    if (path / METASEQ_CONSOLIDATED).exists():
        return [folder_file(path, METASEQ_CONSOLIDATED, "metaseq checkpoint")]
    raise FileNotFoundError(
        f"{path} holds no metaseq checkpoint (looked for *model_part-N.pt and {METASEQ_CONSOLIDATED})"
    )


def detect_format(path: str | os.PathLike[str], prefer: Iterable[str] | None = None) -> str:
    """The format to read at `path`: a file's suffix, else the first of `prefer` (default: every
    format in preference order: safetensors, bin, tf-h5, flax-msgpack, metaseq) present in the folder.

    Raises:
        FileNotFoundError: nothing there, or none of the wanted formats.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    wanted = list(prefer) if prefer is not None else list(READ_FORMATS)
    if not path.is_dir():
        fmt = SUFFIXES.get(path.suffix)
        if fmt is None:
            raise FileNotFoundError(
                f"cannot tell the format of {path} from its suffix; expected one of {sorted(SUFFIXES)}"
            )
        return fmt
    present = formats_present(path)
    for fmt in wanted:
        if fmt in present:
            return fmt
        if fmt == "metaseq":
            try:
                metaseq_parts(path)
                return fmt
            except (FileNotFoundError, CheckpointError):
                pass
    names = ", ".join(f for fmt in wanted for f in FORMATS.get(fmt, ("*model_part-N.pt", METASEQ_CONSOLIDATED)) if f)
    raise FileNotFoundError(f"{path} holds no OPT weights (looked for {names})")


def read_index(path: Path) -> dict[str, str]:
    """`weight_map` (tensor key -> shard file name) of a sharded checkpoint's index.

    Raises:
        CheckpointError: not valid JSON (or beyond `opt_core.safe_files`' size and depth limits), no
            `weight_map` object, a key that is not a string, or a shard entry that is not a plain file
            name (`../x`, `/etc/passwd`, `sub/x`).
    """
    data = read_json(path, CheckpointError, what="shard index", expect=dict)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"shard index {path} has no 'weight_map' object")
    for name in dict.fromkeys(weight_map.values()):
        shard_path(path.parent, name, path)
    return {str(k): str(v) for k, v in weight_map.items()}


def resolve_files(path: str | os.PathLike[str], fmt: str) -> tuple[list[Path], dict[str, str] | None]:
    """The files holding format `fmt` at `path` (a folder or one file) and the index's weight map
    (None without an index). Every file is checked to be a regular file.

    Raises:
        FileNotFoundError: no such weights; CheckpointError: a bad index, a missing shard, a
            FIFO/device where a weight file should be.
    """
    path = Path(path)
    if fmt == "metaseq":
        return metaseq_parts(path), None
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(READ_FORMATS)}")
    if not path.is_dir():
        return [check_regular_file(path)], None
    single, index = FORMATS[fmt]
    if index is not None and os.path.lexists(path / index):
        weight_map = read_index(folder_file(path, index, "shard index"))
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{path / index} names shards that do not exist: {missing}")
        return [folder_file(path, s, "shard") for s in shards], weight_map
    if os.path.lexists(path / single):
        return [folder_file(path, single)], None
    raise FileNotFoundError(f"{path} has no {single}" + (f" or {index}" if index else ""))


def weight_files(folder: str | os.PathLike[str], fmt: str) -> list[Path]:
    """The files holding format `fmt` in `folder` (see `resolve_files`)."""
    return resolve_files(folder, fmt)[0]


# ---------------------------------------------------------------- sharding (write side)
def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors (name -> bytes, in write order) into shards of at most `max_shard_bytes`
    (a tensor larger than the limit gets a shard of its own), as Hugging Face does."""
    if max_shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(base: str, count: int) -> list[str]:
    """`model.safetensors` -> `model-00001-of-00003.safetensors`, ... (single file kept as is)."""
    if count == 1:
        return [base]
    stem, ext = base.rsplit(".", 1)
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]


def write_index(path: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    """Write a Hugging Face `*.index.json` (atomically)."""
    data = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    final_permissions(tmp)
    os.replace(tmp, path)


def parse_size(size: int | str) -> int:
    """Bytes from an int (a byte count) or a string with its unit: "5GB", "500MB", "2GiB", "800B".

    A string must name its unit: "10" from a command line is far more often a forgotten "10GB" than
    ten bytes (one shard per tensor), so it is refused rather than guessed. Sizes are positive."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ValueError(f"a size must be an integer byte count or a string such as '2GB', got {size!r:.60}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"a size must be positive, got {size}")
        return size
    s = size.strip().upper()
    units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            try:
                value = float(number)
            except ValueError:
                break
            if not 0 < value < float("inf") or int(value * factor) < 1:
                raise ValueError(f"a size must be positive, got {size!r:.60}")
            return int(value * factor)
    hint = f"; did you mean '{s}MB' or '{s}GB'?" if s.replace(".", "", 1).isdigit() else ""
    raise ValueError(f"cannot parse size {size!r:.60}: give a number with a unit (B, KB, MB, GB, KiB, MiB, GiB), "
                     f"e.g. '2GB' or '500MB'{hint}")


__all__ = [
    "DEFAULT_SHARD_BYTES", "FLAX_MSGPACK", "FORMATS", "READ_FORMATS", "SAFETENSORS", "SAFETENSORS_INDEX",
    "TF_H5", "TORCH_BIN", "TORCH_BIN_INDEX", "WRITE_FORMATS", "detect_format", "formats_present",
    "is_regular_file", "metaseq_parts", "parse_size", "plan_shards", "read_index", "resolve_files",
    "shard_file_names", "weight_files", "write_index",
]
