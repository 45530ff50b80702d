"""Checkpoints as the models see them: strict key accounting against the canonical table, and
`open_checkpoint`, the one way every backend, the reference model and the converter read weights.

Framework-free. `open_checkpoint` resolves the files once (`opt_core.formats`), opens the reader
once with the config, maps every key onto the canonical table (`account_keys`) and refuses, naming
file and tensor: non-float weights, an untied `lm_head` under a tied config, and (on read) NaN or
infinite values unless `allow_non_finite=True`. Loaders then read one canonical tensor at a time
(`read`, into their own buffer when they can) or a part of one (`get_slice`, for tensor parallelism).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.formats.base import CheckpointError, Reader, TensorSlice, first_non_finite, is_float, same_bits
from opt_core.formats.files import (
    DEFAULT_SHARD_BYTES,
    FLAX_MSGPACK,
    FORMATS,
    READ_FORMATS,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TF_H5,
    TORCH_BIN,
    TORCH_BIN_INDEX,
    detect_format,
    formats_present,
    parse_size,
    plan_shards,
    read_index,
    shard_file_names,
    weight_files,
    write_index,
)
from opt_core.formats.safetensors import save_numpy_safetensors
from opt_core.params import Head, ParamSpec, canonical_name, head_table, parameter_table

# Hugging Face formats a model folder may hold, in load-preference order (metaseq needs `fmt=`).
LOAD_FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")


# ---------------------------------------------------------------- key accounting
# eq=False: hashed by identity, because opt_flax keeps `model.loading_info` as a static attribute of
# the nnx graph, which jax.jit hashes (a field-wise __eq__ without __hash__ made generate fail).
@dataclass(eq=False)
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


# ---------------------------------------------------------------- reading for a model
SMALLEST_WEIGHT_BYTES = 2  # float16 / bfloat16: no checkpoint stores OPT weights in fewer bytes
CONFIG_TO_DISK_RATIO = 4


def check_bytes_on_disk(reader: Reader, config: OPTConfig) -> None:
    """Refuse a config whose decoder needs more bytes than the checkpoint's files hold, before a
    model of that size is allocated (a 664-byte config.json must not make a loader allocate
    gigabytes that the weights could never fill).

    Raises:
        CheckpointError: the config's decoder needs more than `CONFIG_TO_DISK_RATIO` times the
            files' bytes; the message names both.
    """
    from opt_core.params import decoder_table

    on_disk = sum(os.stat(f).st_size for f in reader.files)
    needed = sum(s.numel for s in decoder_table(config)) * SMALLEST_WEIGHT_BYTES
    # A few missing or extra layers are left to key accounting, whose message lists them; a config
    # several times larger than the files is not this checkpoint's config at all.
    if needed > CONFIG_TO_DISK_RATIO * on_disk:
        raise CheckpointError(
            f"checkpoint {reader.source}: the config implies a decoder of {needed // SMALLEST_WEIGHT_BYTES:,} "
            f"parameters (at least {needed:,} bytes at 2 bytes each), but its weight files hold {on_disk:,} bytes; "
            "the config does not describe these weights"
        )


def check_tensors(reader: Reader, acc: KeyAccounting, config: OPTConfig) -> list[str]:
    """The checks every load and conversion makes once the keys are accounted for.

    Returns the canonical names of tied parameters the checkpoint stores anyway with the same bits
    as their target (safe to drop).
    Raises:
        CheckpointError: a non-float tensor; a stored `lm_head.weight` that differs from the
            embedding it is tied to by the config (it would be silently replaced).
    """
    bad = [f"{key} ({reader.dtype(key)}, in {reader.where(key)})" for key in acc.mapping.values()
           if not is_float(reader.dtype(key))]
    if bad:
        raise CheckpointError(
            f"checkpoint {reader.source}: OPT weights are floating point (float16, bfloat16, float32, float64), "
            f"but these are not: {', '.join(bad)}"
        )
    duplicates = []
    for spec in parameter_table(config, Head.CAUSAL_LM):
        if spec.tied_to is None or spec.name not in acc.mapping or spec.tied_to not in acc.mapping:
            continue
        key, target = acc.mapping[spec.name], acc.mapping[spec.tied_to]
        if not same_bits(reader.read(key), reader.read(target)):
            raise CheckpointError(
                f"checkpoint {reader.source}: {key} (in {reader.where(key)}) differs from {target}, but the config "
                "ties them (tie_word_embeddings=true), so the stored head would be silently replaced by the "
                "embedding; set tie_word_embeddings to false in config.json to load it as a separate head"
            )
        duplicates.append(spec.name)
    return duplicates


def check_finite(array: np.ndarray, name: str, where: str) -> None:
    """Raise CheckpointError naming the tensor and file when `array` holds a NaN or infinity."""
    i = first_non_finite(array)
    if i is not None:
        index = np.unravel_index(i, array.shape) if array.ndim else ()
        raise CheckpointError(
            f"{where}: {name} holds {array.reshape(-1)[i]} at index {list(map(int, index))}; weights must be "
            "finite (pass allow_non_finite=True, or --allow-non-finite, to inspect such a file anyway)"
        )


class _CheckedSlice(TensorSlice):
    def __init__(self, inner: TensorSlice, name: str, where: str, check: bool):
        self.inner, self.name, self.where_, self.check = inner, name, where, check
        self.shape, self.dtype = inner.shape, inner.dtype

    def __getitem__(self, index: object) -> np.ndarray:
        out = self.inner[index]
        if self.check:
            check_finite(out, self.name, self.where_)
        return out


@dataclass
class CheckpointLoad:
    """A checkpoint opened for one model: read canonical tensors one at a time.

    Attributes:
        reader: the format's reader (opened once, with the config).
        config, head: the model being loaded.
        accounting: how the checkpoint's keys map onto the canonical table.
        names: canonical names to read, in file order (a tied head stored with the embedding's
            bits is left out: it is the embedding).
        allow_non_finite: skip the NaN/infinity check.
    """

    reader: Reader
    config: OPTConfig
    head: Head
    accounting: KeyAccounting
    names: list[str] = field(default_factory=list)
    allow_non_finite: bool = False

    @property
    def source(self) -> str:
        return self.reader.source

    @property
    def fmt(self) -> str:
        return self.reader.fmt

    def key(self, name: str) -> str:
        """The checkpoint key canonical `name` is read from."""
        return self.accounting.mapping[name]

    def dtype(self, name: str) -> np.dtype:
        return self.reader.dtype(self.key(name))

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Canonical tensor `name` (canonical layout, stored dtype), into `out` when it fits.

        Raises:
            CheckpointError: NaN or infinite values (unless allowed), a truncated file.
        """
        key = self.key(name)
        arr = self.reader.read(key, out)
        if not self.allow_non_finite:
            check_finite(arr, key, self.reader.where(key))
        return arr

    def get_slice(self, name: str) -> TensorSlice:
        """A lazily read part of canonical tensor `name`: `load.get_slice(n)[a:b]` reads only rows
        a..b where the format allows (safetensors), for loaders that shard tensors."""
        key = self.key(name)
        return _CheckedSlice(self.reader.get_slice(key), key, self.reader.where(key), not self.allow_non_finite)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(canonical name, fresh array) for every name in `names`."""
        for name in self.names:
            yield name, self.read(name)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> CheckpointLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    path: str | os.PathLike[str],
    config: OPTConfig,
    head: Head | str,
    *,
    fmt: str | None = None,
    prefer: Sequence[str] | None = None,
    allow_non_finite: bool = False,
) -> CheckpointLoad:
    """Open the weights at `path` (a folder in any Hugging Face format, one weight file, or with
    `fmt="metaseq"` metaseq parts) for a model of `config` and `head`, with every key accounted for.

    Args:
        path: the folder or file.
        config: the model's config (shapes are checked against it).
        head: the model kind being loaded.
        fmt: "safetensors", "bin", "tf-h5", "flax-msgpack" or "metaseq"; default: the first of
            `prefer` present in the folder.
        prefer: the formats to look for, in order (default: safetensors, bin, tf-h5, flax-msgpack).
            Each backend passes its own, as Hugging Face's loaders do (Flax reads flax_model.msgpack
            first), so a folder whose formats disagree shows it in `opt verify`.
        allow_non_finite: read NaN/infinite weights instead of refusing them.
    Returns:
        A `CheckpointLoad` (a context manager; close it when done).
    Raises:
        FileNotFoundError: no weights at `path`.
        CheckpointError: unknown/missing/misshapen/duplicated tensors (all listed), hostile or
            corrupt files, non-float weights, an untied head under a tied config.
    """
    from opt_core.formats import open_reader

    head = Head(head)
    path = Path(path)
    if fmt is not None and fmt not in READ_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(READ_FORMATS)}")
    fmt = fmt or detect_format(path, prefer=LOAD_FORMATS if prefer is None else prefer)
    reader = open_reader(path, fmt, config)
    try:
        check_bytes_on_disk(reader, config)
        acc = account_keys(reader.shapes(), config, head)
        acc.raise_for_errors(str(path))
        duplicates = set(check_tensors(reader, acc, config))
        order = {key: i for i, key in enumerate(reader.shapes())}
        names = sorted((n for n in acc.mapping if n not in duplicates), key=lambda n: order[acc.mapping[n]])
        acc.tied += sorted(duplicates)
        return CheckpointLoad(reader, config, head, acc, names, allow_non_finite)
    except BaseException:
        reader.close()
        raise


def load_numpy_state_dict(
    folder: str | os.PathLike[str], config: OPTConfig, head: Head | str, *, fmt: str | None = None,
    allow_non_finite: bool = False,
) -> tuple[dict[str, np.ndarray], KeyAccounting]:
    """Canonical name -> NumPy array (canonical layout) for every parameter of `head` in a
    checkpoint of any format (tied parameters filled from their target; new head parameters absent).

    Raises:
        CheckpointError, FileNotFoundError: as `open_checkpoint`.
    """
    with open_checkpoint(folder, config, head, fmt=fmt, allow_non_finite=allow_non_finite) as ckpt:
        state = dict(ckpt.tensors())
        acc = ckpt.accounting
    for spec in parameter_table(config, head):
        if spec.name in acc.tied and spec.tied_to is not None:
            state[spec.name] = state[spec.tied_to]
    return state, acc


def save_checkpoint(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    config: OPTConfig,
    head: Head | str,
    *,
    formats: Iterable[str] = ("safetensors",),
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
    architecture: str | None = None,
    generation_config: Any = None,
) -> list[Path]:
    """Write a Hugging Face model folder: `config.json` (its `torch_dtype` the weights' dtype),
    the weights in each of `formats` ("safetensors", "bin", "tf-h5", "flax-msgpack"), streamed one
    tensor at a time, and `generation_config` (anything with `save_pretrained(folder)`) when given.

    The write is a transaction (`opt_core.transaction`, merge rule): everything goes into a fresh
    temporary folder and is swapped in complete; the folder's other files stay; weight files of an
    earlier save listed in its `.opt-manifest.json` and not written again are removed, while weight
    files this project did not write make the save refuse (they would contradict the new weights).

    Args:
        tensors: canonical name -> array in canonical layout for every stored parameter (the tied
            LM head may be absent; Hugging Face leaves it out).
        max_shard_size: safetensors/bin shard limit (bytes or "5GB").
        architecture: the class name written to `architectures`.
    Returns:
        Every written path, config.json first.
    Raises:
        CheckpointError: a tensor missing or misshapen; ValueError: a format that cannot hold the model;
        opt_core.transaction.OutputError (an OSError): a folder that cannot be written as asked.
    """
    from opt_core.formats import writer_class
    from opt_core.transaction import WriteTransaction

    folder = Path(folder)
    head = Head(head)
    formats = list(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stored = [s for s in parameter_table(config, head) if s.tied_to is None]
    missing = [s.name for s in stored if s.name not in tensors]
    if missing:
        raise CheckpointError(f"cannot save to {folder}: tensors missing: {', '.join(missing)}")
    for fmt in formats:
        writer_class(fmt).check_model(config, head)
    with WriteTransaction(folder, merge=True, stale=is_weight_file, what="save_pretrained folder") as tx:
        written = _write_checkpoint(tx.path, tensors, config, head, stored, formats, max_shard_size, architecture)
        if generation_config is not None:
            written.append(Path(generation_config.save_pretrained(tx.path)))
        tx.commit()
    return [tx.dst / p.name for p in written]


def is_weight_file(name: str) -> bool:
    """Whether `name` is exactly a Hugging Face weight file of any format (single file, shard with
    five-digit numbering, or index): what a new save supersedes."""
    for single, index in FORMATS.values():
        stem, ext = single.rsplit(".", 1)
        if name in (single, index) or re.fullmatch(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.{ext}", name):
            return True
    return False


def _write_checkpoint(folder: Path, tensors: Mapping[str, np.ndarray], config: OPTConfig, head: Head,
                      stored: list[ParamSpec], formats: list[str], max_shard_size: int | str,
                      architecture: str | None) -> list[Path]:
    """`save_checkpoint`'s files, written into the fresh folder `folder`."""
    from opt_core.formats import TensorPlan, dtype_name, writer_class
    from opt_core.formats.base import final_permissions
    from opt_core.params import hf_name

    extra = dict(config.extra)
    extra.pop("dtype", None)
    if architecture is not None:
        extra["architectures"] = [architecture]
    dtype = np.asarray(tensors[stored[0].name]).dtype
    config = config.replace(torch_dtype=dtype_name(dtype), extra=extra)
    written = [config.save_pretrained(folder)]
    final_permissions(written[0])
    for fmt in formats:
        plan = [TensorPlan(s, hf_name(s.name, head), np.asarray(tensors[s.name]).dtype) for s in stored]
        writer = writer_class(fmt)(folder, plan, config, head, parse_size(max_shard_size))
        try:
            writer.write_all(lambda name: np.asarray(tensors[name]))
            written += writer.commit()
        except BaseException:
            writer.abort()
            raise
    return written


def iter_safetensors(files: list[Path], keys: Mapping[str, object] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, NumPy array) one tensor at a time from safetensors files (no accounting)."""
    from opt_core.formats.safetensors import SafetensorsReader

    wanted = set(keys) if keys is not None else None
    for path in files:
        with SafetensorsReader(path, files=[Path(path)]) as reader:
            for key in reader.shapes():
                if wanted is None or key in wanted:
                    yield key, reader.read(key)


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape over safetensors files, read from the headers only."""
    from opt_core.formats.safetensors import read_header

    return {k: e.shape for path in files for k, e in read_header(Path(path))[0].items()}


# The one docstring of every backend's `from_pretrained` / `save_pretrained` (each backend appends
# the line naming its own options), as GENERATE_DOC is `generate`'s.
FROM_PRETRAINED_DOC = """Load a Hugging Face OPT folder or Hub id into this class.

Args:
    name_or_path: a folder holding `config.json` and weights in any format (safetensors, bin,
        tf-h5, flax-msgpack; single or sharded), or a Hub id (`facebook/opt-125m`).
    dtype: None (float32, as Hugging Face), "auto" (the config's torch_dtype), "float32",
        "float16"/"fp16" or "bfloat16"/"bf16".
    config: use this `OPTConfig` instead of the folder's config.json.
    format: read this format when the folder holds several ("safetensors", "bin", "tf-h5",
        "flax-msgpack"; default: the backend's own order, as Hugging Face's loader for that framework).
    revision: branch, tag or commit of a Hub id.
    allow_non_finite: load NaN/infinite weights instead of refusing them (for inspection).
    quantize: None, "int8" (weight-only) or "w8a8": inference only, quantized from the float weights
        (torch also has "int4"; another backend refuses it with a ValueError).
    **backend_options: what one backend alone has (listed below), and, as in Hugging Face,
        config overrides: any `OPTConfig` field by its config.json name (`num_labels=3`,
        `dropout=0.0`, `attention_dropout`, `pad_token_id`, ...), `id2label` and `label2id`, applied
        to the folder's config (or `config=`) and checked like config.json values; `id2label`
        sets `num_labels` (`opt_core.config_overrides`). A head the checkpoint lacks (a causal LM
        loaded for classification) is initialised at the new size; a stored head of another size
        is a CheckpointError. Any other keyword, another backend's option included, is a
        TypeError naming it.
        torch alone loads models larger than memory: `device_map` ("auto", or module path -> GPU
        index / "cpu" / "disk"), `max_memory` ({0: "10GiB", "cpu": "1GB"}), `offload_folder`
        (`opt_torch.offload`; `model.hf_device_map` reports the placement).
Returns:
    The model (inference mode); `model.loading_info` is the `KeyAccounting` of the load and, for a
    causal LM, `model.generation_config` the folder's generation_config.json; `model.config` has
    the overrides.
Raises:
    FileNotFoundError: no folder, config or weights.
    CheckpointError: missing, unexpected or misshapen tensors (all listed), hostile or unreadable
        files, non-float or non-finite weights, an untied head under a tied config.
    ValueError: an unknown dtype or quantize mode; an override a config.json could not hold.
"""

SAVE_PRETRAINED_DOC = """Write `config.json`, the weights under Hugging Face's names (a tied `lm_head.weight` left
out, as Hugging Face does) and, for a causal LM, `generation_config.json` to `folder`.

Args:
    folder: the output folder (created if needed).
    max_shard_size: safetensors / bin files are sharded above this size (bytes, or "5GB").
    formats: the weight formats to write, from "safetensors", "bin", "tf-h5", "flax-msgpack"
        (default: safetensors).
    **backend_options: what one backend alone has (listed below); another backend raises TypeError.
Returns:
    Every written path, config.json first.
"""


__all__ = [
    "DEFAULT_SHARD_BYTES", "FLAX_MSGPACK", "FORMATS", "FROM_PRETRAINED_DOC", "SAVE_PRETRAINED_DOC",
    "LOAD_FORMATS", "SAFETENSORS", "SAFETENSORS_INDEX", "TF_H5",
    "TORCH_BIN", "TORCH_BIN_INDEX", "CheckpointError", "CheckpointLoad", "KeyAccounting", "account_keys",
    "check_finite", "check_tensors", "detect_format", "formats_present",
    "is_weight_file", "iter_safetensors", "load_numpy_state_dict",
    "open_checkpoint", "parse_size", "plan_shards", "read_index", "safetensors_shapes", "save_checkpoint",
    "save_numpy_safetensors",
    "shard_file_names", "weight_files", "write_index",
]
