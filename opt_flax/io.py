"""Loading and saving Hugging Face OPT folders through the canonical parameter table.

The model's `nnx.state` paths are Hugging Face Flax paths, so `opt_core.formats.flax_msgpack.flax_path`
is the one mapping used for both safetensors (canonical names) and `flax_model.msgpack` files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core.checkpoint import (
    FLAX_MSGPACK,
    CheckpointError,
    account_keys,
    detect_format,
    iter_safetensors,
    safetensors_shapes,
    save_numpy_safetensors,
    weight_files,
)
from opt_core.config import OPTConfig
from opt_core.formats.flax_msgpack import flax_msgpack_shapes, flax_path, read_flax_msgpack, write_flax_msgpack
from opt_core.layout import from_layout, to_layout
from opt_core.params import Head, hf_name, parameter_table

LOADABLE_FORMATS = ("safetensors", "flax-msgpack")


def _state_path(spec_path: tuple[str, ...]) -> tuple[Any, ...]:
    """Flax checkpoint path -> `nnx.state` path (list indices are ints there)."""
    return tuple(int(p) if p.isdigit() else p for p in spec_path)


def from_pretrained(
    cls: type,
    folder: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    format: str | None = None,
    rngs: nnx.Rngs | None = None,
    remat: bool = False,
    config: OPTConfig | None = None,
    quantize: str | None = None,
) -> Any:
    """Build `cls` (an opt_flax model class) from a Hugging Face folder.

    Args:
        folder: holds config.json and `model.safetensors` (or shards) or `flax_model.msgpack`.
        dtype: computation dtype; param_dtype: storage dtype (default: `dtype`).
        format: "safetensors" or "flax-msgpack" (default: the first present, in that order).
        rngs: dropout / new-head initialisation keys.
        config: use this config instead of the folder's config.json.
        quantize: None, "int8" (weight-only) or "w8a8": inference only (`opt_flax.quantize`).
    Returns:
        The model, every parameter loaded (a task head missing from the checkpoint is initialised).
    Raises:
        CheckpointError: a tensor is missing, unexpected or misshapen (all are listed).
        FileNotFoundError: no config or no supported weights in `folder`.
    """
    folder = Path(folder)
    config = config if config is not None else OPTConfig.from_pretrained(folder)
    param_dtype = dtype if param_dtype is None else param_dtype
    head = Head(cls.head)
    fmt = format or detect_format(folder, prefer=LOADABLE_FORMATS)
    if fmt not in LOADABLE_FORMATS:
        raise ValueError(f"opt_flax reads {LOADABLE_FORMATS}, not {fmt!r}; convert the folder first (opt convert)")
    if fmt == "safetensors":
        files = weight_files(folder, fmt)
        shapes = safetensors_shapes(files)
    else:
        msgpack_path = folder / FLAX_MSGPACK
        shapes = flax_msgpack_shapes(msgpack_path, config)
    acc = account_keys(shapes, config, head)
    acc.raise_for_errors(str(folder))

    model = cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
    table = {s.name: s for s in parameter_table(config, head)}
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    source_to_name = {v: k for k, v in acc.mapping.items()}
    if fmt == "safetensors":
        stream = ((source_to_name[k], a) for k, a in iter_safetensors(files, source_to_name))
    else:
        stream = read_flax_msgpack(msgpack_path, names=acc.mapping, config=config)
    filled = set()
    for name, arr in stream:
        spec = table[name]
        if spec.tied_to is not None and config.tie_word_embeddings:
            continue  # the tied lm_head is the embedding itself; nothing to store
        path = _state_path(flax_path(spec, head))
        var = flat.get(path)
        if var is None:
            raise CheckpointError(f"{folder}: {name} has no parameter in {cls.__name__} (path {path})")
        arr = to_layout(np.asarray(arr), spec.layout("flax"))
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
        filled.add(path)
    needed = set(flat) - {_state_path(flax_path(table[n], head)) for n in acc.new_head}
    unfilled = sorted("/".join(map(str, p)) for p in needed - filled)
    if unfilled:
        raise CheckpointError(f"{folder}: parameters left unloaded: {', '.join(unfilled)}")
    nnx.update(model, nnx.from_flat_state(flat))
    from opt_flax.quantize import quantize_loaded

    return quantize_loaded(model, quantize)


def canonical_tensors(model: Any) -> dict[str, np.ndarray]:
    """Canonical name -> NumPy array (canonical torch layout) of every stored parameter of `model`
    (a tied `lm_head.weight` is left out, as Hugging Face's safetensors writer does)."""
    config: OPTConfig = model.config
    head = Head(model.head)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out: dict[str, np.ndarray] = {}
    for spec in parameter_table(config, head):
        if spec.tied_to is not None:
            continue
        var = flat[_state_path(flax_path(spec, head))]
        arr = np.asarray(jax.device_get(var.get_value()))
        out[spec.name] = from_layout(arr, spec.layout("flax"))
    return out


def save_pretrained(
    model: Any,
    folder: str | os.PathLike[str],
    *,
    flax_msgpack: bool = False,
    safetensors: bool = True,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Write config.json, `model.safetensors` (Hugging Face torch names; sharded above
    `max_shard_size`) and, with `flax_msgpack=True`, a `flax_model.msgpack` that Hugging Face's
    `FlaxOPTForCausalLM` loads. Returns the written paths."""
    folder = Path(folder)
    config: OPTConfig = model.config
    head = Head(model.head)
    written = [config.save_pretrained(folder)]
    tensors = canonical_tensors(model)
    if safetensors:
        written += save_numpy_safetensors(folder, {hf_name(k, head): v for k, v in tensors.items()}, max_shard_size)
    if flax_msgpack:
        written.append(write_flax_msgpack(folder / FLAX_MSGPACK, tensors, config, head))
    return written
