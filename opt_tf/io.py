"""Loading and saving the TensorFlow models through the canonical parameter table.

Reads Hugging Face folders holding safetensors (single or sharded) or a `tf_model.h5`
(`opt_core.formats.tf_h5`); every tensor is accounted for with `opt_core.checkpoint.account_keys`
before a single weight is assigned, and streamed one at a time into its variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from opt_core import CheckpointError, OPTConfig, account_keys
from opt_core.checkpoint import (
    DEFAULT_SHARD_BYTES,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TF_H5,
    detect_format,
    formats_present,
    iter_safetensors,
    safetensors_shapes,
    save_numpy_safetensors,
    weight_files,
)
from opt_core.formats.flax_msgpack import flax_msgpack_shapes, read_flax_msgpack
from opt_core.formats.tf_h5 import read_tf_h5, tf_h5_shapes, write_tf_h5
from opt_core.layout import from_layout, to_layout
from opt_core.params import Head, hf_name, parameter_table

logger = logging.getLogger(__name__)
LOAD_FORMATS = ("safetensors", "tf-h5", "flax-msgpack")


def _model_class(cls_or_head: Any) -> type:
    from opt_tf.modeling import MODEL_CLASSES, OPTPreTrainedModel

    if isinstance(cls_or_head, type) and issubclass(cls_or_head, OPTPreTrainedModel):
        return cls_or_head
    return MODEL_CLASSES[Head(cls_or_head)]


def _check_dtype(dtype: Any) -> None:
    if dtype is None or dtype in ("float32", "auto") or dtype == tf.float32 or dtype == np.float32:
        return
    raise ValueError(
        f"opt_tf computes in float32 only (got dtype={dtype!r}); load with dtype=None or 'float32'"
    )


def from_pretrained(
    model_class: Any,
    folder: str | os.PathLike[str],
    dtype: Any = None,
    config: OPTConfig | None = None,
    format: str | None = None,
    quantize: str | None = None,
) -> Any:
    """Load a Hugging Face OPT folder into `model_class` (a model class or a `Head`).

    Args:
        folder: holds `config.json` and safetensors weights (single or sharded), `tf_model.h5` or
            `flax_model.msgpack`.
        dtype: None or "float32" (the only compute dtype of this backend).
        config: use this config instead of the folder's config.json.
        format: "safetensors", "tf-h5" or "flax-msgpack" to pick one when the folder holds several
            (default: the first present, in that order).
        quantize: None, "int8" (weight-only) or "w8a8": inference only (`opt_tf.quantize`).
    Returns:
        The model; `model.loading_info` is the `KeyAccounting` of the load.
    Raises:
        FileNotFoundError: no folder, config or readable weights.
        CheckpointError: missing, unexpected or misshapen tensors (all listed), unreadable files.
    """
    cls = _model_class(model_class)
    _check_dtype(dtype)
    folder = Path(folder)
    config = config if config is not None else OPTConfig.from_pretrained(folder)
    prefer = [format] if format is not None else list(LOAD_FORMATS)
    if format is not None and format not in LOAD_FORMATS:
        raise ValueError(f"format must be one of {LOAD_FORMATS}, got {format!r}")
    try:
        fmt = detect_format(folder, prefer=prefer)
    except FileNotFoundError:
        present = formats_present(folder) if folder.is_dir() else []
        if present:
            raise FileNotFoundError(
                f"{folder} holds only {present} weights; opt_tf reads safetensors, tf_model.h5 and "
                f"flax_model.msgpack (convert with: opt convert {folder} OUT --to safetensors)"
            ) from None
        raise
    files = weight_files(folder, fmt)
    if fmt == "safetensors":
        shapes = safetensors_shapes(files)
    elif fmt == "tf-h5":
        shapes = tf_h5_shapes(files[0], config)
    else:
        shapes = flax_msgpack_shapes(files[0], config)
    head = cls.head
    acc = account_keys(shapes, config, head)
    acc.raise_for_errors(str(folder))

    model = cls(config)
    variables = model.named_weights()
    specs = {s.name: s for s in parameter_table(config, head)}
    source_to_name = {src: name for name, src in acc.mapping.items()}
    tensors: Iterator[tuple[str, np.ndarray]]
    if fmt == "safetensors":
        tensors = iter_safetensors(files, source_to_name)
    elif fmt == "tf-h5":
        tensors = read_tf_h5(files[0], set(source_to_name), config)
    else:
        tensors = read_flax_msgpack(files[0], set(source_to_name), config)
    filled: set[str] = set()
    for key, arr in tensors:
        name = source_to_name[key]
        if name not in variables:  # a tied lm_head stored anyway: its target is loaded
            filled.add(name)
            continue
        value = to_layout(np.asarray(arr, dtype=np.float32), specs[name].layout("tf"))
        variables[name].assign(value)
        filled.add(name)
    filled.update(acc.tied)
    if acc.new_head:
        filled.update(acc.new_head)
        logger.warning(
            "%s has no %s head; initialised %s from N(0, %s): train them before use",
            folder, head.value, ", ".join(acc.new_head), config.init_std,
        )
    unfilled = [n for n in specs if n not in filled]
    if unfilled:
        raise CheckpointError(f"{folder}: tensors left unfilled after loading: {unfilled}")
    model.loading_info = acc
    from opt_tf.quantize import quantize_loaded

    return quantize_loaded(model, quantize)


def state_dict(model: Any) -> dict[str, np.ndarray]:
    """Canonical name -> NumPy array in canonical (torch) layout for every stored parameter (the
    tied LM head left out, as Hugging Face does)."""
    specs = {s.name: s for s in parameter_table(model.config, model.head)}
    return {
        name: from_layout(np.asarray(var.numpy()), specs[name].layout("tf"))
        for name, var in model.named_weights().items()
    }


def save_pretrained(
    model: Any,
    folder: str | os.PathLike[str],
    tf_h5: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write `config.json` and safetensors weights (Hugging Face torch names) to `folder`, plus a
    `tf_model.h5` that Hugging Face's TF classes load when `tf_h5` is True. Returns the written
    weight files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: OPTConfig = model.config
    head = model.head
    extra = dict(config.extra)
    extra["architectures"] = [type(model).__name__]
    config.replace(torch_dtype="float32", extra=extra).save_pretrained(folder)

    tensors = state_dict(model)
    for old in folder.glob("model-*-of-*.safetensors"):
        old.unlink()  # stale shards of an earlier save would confuse a reader
    if (folder / SAFETENSORS_INDEX).exists():
        (folder / SAFETENSORS_INDEX).unlink()
    written = save_numpy_safetensors(
        folder, {hf_name(n, head): t for n, t in tensors.items()}, max_shard_bytes=max_shard_size
    )
    if len(written) > 1 and (folder / SAFETENSORS).exists():
        (folder / SAFETENSORS).unlink()
    if tf_h5:
        written.append(write_tf_h5(folder / TF_H5, tensors, config, head))
    return written
