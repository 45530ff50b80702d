"""Hugging Face checkpoint folders: which files hold the weights, and strict key accounting.

Framework-free. Backends and converters call `account_keys` with the names and shapes a
checkpoint holds; it maps them onto the canonical table and lists everything that does not fit,
so no loader ever renames by guesswork or skips a tensor silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opt_core.config import OPTConfig
from opt_core.params import Head, ParamSpec, canonical_name, head_table, parameter_table

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TF_H5 = "tf_model.h5"
FLAX_MSGPACK = "flax_model.msgpack"

# Format name -> (single file, index file or None); the order is the load preference.
FORMATS: dict[str, tuple[str, str | None]] = {
    "safetensors": (SAFETENSORS, SAFETENSORS_INDEX),
    "bin": (TORCH_BIN, TORCH_BIN_INDEX),
    "tf-h5": (TF_H5, None),
    "flax-msgpack": (FLAX_MSGPACK, None),
}

DEFAULT_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default max_shard_size ("5GB")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names files, keys and shapes."""


# ---------------------------------------------------------------- which files
def formats_present(folder: str | os.PathLike[str]) -> list[str]:
    """Weight formats found in `folder`, in load-preference order."""
    folder = Path(folder)
    return [
        fmt
        for fmt, (single, index) in FORMATS.items()
        if (folder / single).is_file() or (index is not None and (folder / index).is_file())
    ]


def detect_format(folder: str | os.PathLike[str], prefer: Iterable[str] | None = None) -> str:
    """The weight format to load from `folder`: the first of `prefer` (default: all formats in
    preference order) that is present.

    Raises:
        FileNotFoundError: the folder does not exist or holds none of the wanted formats.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    present = formats_present(folder)
    wanted = list(prefer) if prefer is not None else list(FORMATS)
    for fmt in wanted:
        if fmt in present:
            return fmt
    names = ", ".join(f for fmt in wanted for f in FORMATS[fmt] if f)
    raise FileNotFoundError(f"{folder} holds no OPT weights (looked for {names})")


def weight_files(folder: str | os.PathLike[str], fmt: str) -> list[Path]:
    """The files holding format `fmt` in `folder`: the single file, or every shard of its index.

    Raises:
        CheckpointError: an index that is not valid JSON, lacks `weight_map`, or names missing shards.
    """
    folder = Path(folder)
    single, index = FORMATS[fmt]
    if index is not None and (folder / index).is_file():
        weight_map = read_index(folder / index)
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder / index} names shards that do not exist: {missing}")
        return [folder / s for s in shards]
    if (folder / single).is_file():
        return [folder / single]
    raise FileNotFoundError(f"{folder} has no {single}")


def read_index(path: Path) -> dict[str, str]:
    """`weight_map` (tensor key -> shard file name) of a sharded checkpoint's index."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path} has no 'weight_map' object")
    return {str(k): str(v) for k, v in weight_map.items()}


# ---------------------------------------------------------------- key accounting
@dataclass
class KeyAccounting:
    """How a checkpoint's keys map onto the canonical table for one model kind.

    Attributes:
        mapping: canonical name -> the checkpoint key it is read from.
        tied: canonical names absent from the checkpoint that are filled from their tie target.
        new_head: head parameters the checkpoint lacks (a base LM loaded into a task head); the
            model initialises them.
        ignored: checkpoint keys of a different head (e.g. `lm_head.weight` when loading
            `OPTModel`), read by no one, as Hugging Face does.
        missing / unexpected / misshapen / duplicated: errors; `raise_for_errors` reports them all.
    """

    mapping: dict[str, str] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)
    new_head: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshapen: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    duplicated: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshapen or self.duplicated)

    def raise_for_errors(self, source: str) -> None:
        """Raise one `CheckpointError` listing every problem, or return if there is none."""
        if self.ok:
            return
        lines = [f"checkpoint {source} does not match the model's parameter table:"]
        if self.missing:
            lines.append(f"  missing tensors ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected tensors ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, got, want in self.misshapen:
            lines.append(f"  wrong shape: {key} is {list(got)}, the config implies {list(want)}")
        for a, b in self.duplicated:
            lines.append(f"  the same parameter twice: {a} and {b}")
        raise CheckpointError("\n".join(lines))


_ALL_HEADS = (Head.CAUSAL_LM, Head.SEQUENCE_CLASSIFICATION, Head.QUESTION_ANSWERING)


def account_keys(
    shapes: Mapping[str, tuple[int, ...]],
    config: OPTConfig,
    head: Head | str,
    *,
    table: list[ParamSpec] | None = None,
) -> KeyAccounting:
    """Map checkpoint keys (either HF prefix variant) onto the canonical table of `head`.

    Args:
        shapes: checkpoint key -> shape, in canonical (torch) layout.
        config: the model's config; shapes are checked against it.
        head: which model is being loaded.
        table: the table to check against (default `parameter_table(config, head)`).
    Returns:
        A `KeyAccounting`; call `raise_for_errors` to stop on any mismatch.
    """
    head = Head(head)
    table = table if table is not None else parameter_table(config, head)
    by_name = {s.name: s for s in table}
    own_head = {s.name for s in head_table(config, head)}
    other_heads = {
        s.name for h in _ALL_HEADS if h is not head for s in head_table(config, h)
    } - own_head
    acc = KeyAccounting()
    for key, shape in shapes.items():
        name = canonical_name(key)
        spec = by_name.get(name)
        if spec is None:
            (acc.ignored if name in other_heads else acc.unexpected).append(key)
            continue
        if name in acc.mapping:
            acc.duplicated.append((acc.mapping[name], key))
            continue
        if tuple(shape) != spec.shape:
            acc.misshapen.append((key, tuple(shape), spec.shape))
        acc.mapping[name] = key
    for spec in table:
        if spec.name in acc.mapping:
            continue
        if spec.tied_to is not None and spec.tied_to in acc.mapping:
            acc.tied.append(spec.name)
        elif spec.name in own_head:
            acc.new_head.append(spec.name)
        else:
            acc.missing.append(spec.name)
    return acc


# ---------------------------------------------------------------- safetensors, NumPy side
def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape over safetensors files, read from the headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return shapes


def iter_safetensors(files: list[Path], keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, NumPy array) one tensor at a time from safetensors files."""
    from safetensors import safe_open

    wanted = set(keys) if keys is not None else None
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    if wanted is None or key in wanted:
                        yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None


def load_numpy_state_dict(
    folder: str | os.PathLike[str], config: OPTConfig, head: Head | str
) -> tuple[dict[str, np.ndarray], KeyAccounting]:
    """Canonical name -> NumPy array for every parameter of `head` found in a safetensors folder
    (tied parameters filled from their target; new head parameters absent).

    Raises:
        CheckpointError: key accounting failed or a file is unreadable.
        FileNotFoundError: no safetensors weights in `folder`.
    """
    files = weight_files(folder, detect_format(folder, prefer=["safetensors"]))
    acc = account_keys(safetensors_shapes(files), config, head)
    acc.raise_for_errors(str(folder))
    source_to_name = {v: k for k, v in acc.mapping.items()}
    state = {source_to_name[key]: arr for key, arr in iter_safetensors(files, source_to_name)}
    for spec in parameter_table(config, head):
        if spec.name in acc.tied:
            assert spec.tied_to is not None
            state[spec.name] = state[spec.tied_to]
    return state, acc


# ---------------------------------------------------------------- sharding
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot parse size {size!r}; use bytes or a value like '2GB', '500MB'") from None


def save_numpy_safetensors(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    base_name: str = SAFETENSORS,
) -> list[Path]:
    """Write NumPy tensors (Hugging Face keys, canonical layout) as Hugging Face safetensors:
    one file, or shards plus `model.safetensors.index.json` above `max_shard_bytes`.

    Each file is written under a temporary name and renamed, so a crash never leaves a
    half-written checkpoint under the final name. Returns the written paths.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {k: int(v.nbytes) for k, v in tensors.items()}
    shards = plan_shards(sizes, parse_size(max_shard_bytes))
    names = shard_file_names(base_name, len(shards))
    written = []
    for shard, name in zip(shards, names):
        tmp = folder / f".{name}.tmp"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in shard}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
        written.append(folder / name)
    index = folder / (base_name + ".index.json")
    if len(shards) > 1:
        write_index(index, {k: n for shard, n in zip(shards, names) for k in shard}, sum(sizes.values()))
        written.append(index)
    elif index.exists():
        index.unlink()  # a stale index would point at shards that no longer match
    return written
