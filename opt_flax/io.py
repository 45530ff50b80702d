"""Loading and saving Hugging Face OPT folders through the canonical parameter table.

Loading reads every checkpoint format through `opt_core.checkpoint.open_checkpoint` (safetensors,
`pytorch_model.bin` with no code run, `tf_model.h5`, `flax_model.msgpack`, single or sharded, a
local folder or a Hub id), which accounts for every key and refuses hostile or broken files.
`io` takes the model class as an argument and never imports `modeling`.

The model's `nnx.state` paths are Hugging Face Flax paths, so `opt_core.formats.flax_msgpack.flax_path`
is the one mapping used for both safetensors (canonical names) and `flax_model.msgpack` files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core.checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    CheckpointLoad,
    open_checkpoint,
    save_checkpoint,
)
from opt_core.config import OPTConfig
from opt_core.config_overrides import apply_config_overrides, loader_options
from opt_core.formats import dtype_name, resolve_dtype
from opt_core.formats.flax_msgpack import flax_path
from opt_core.generation_config import GenerationConfig
from opt_core.hub import resolve_pretrained
from opt_core.layout import from_layout, to_layout
from opt_core.params import Head, parameter_table

# Formats looked for when a folder holds several: Flax's own file first, as Hugging Face's Flax loader.
LOAD_ORDER = ("flax-msgpack", "safetensors", "bin", "tf-h5")
logger = logging.getLogger(__name__)


def _state_path(spec_path: tuple[str, ...]) -> tuple[Any, ...]:
    """Flax checkpoint path -> `nnx.state` path (list indices are ints there)."""
    return tuple(int(p) if p.isdigit() else p for p in spec_path)


def jax_dtype(dtype: Any, config: OPTConfig | None = None) -> Any:
    """A JAX dtype from a name ("float16", "bf16", ...), a dtype, None (float32) or "auto" (the
    config's torch_dtype).

    Raises:
        ValueError: an unknown dtype, or float64 without JAX's x64 mode.
    """
    if dtype is None:
        return jnp.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = (config.torch_dtype if config is not None else None) or "float32"
        return _computable(jnp.dtype(dtype_name(resolve_dtype(dtype))))  # type: ignore[arg-type]
    return _computable(jnp.dtype(dtype))


def _computable(dtype: Any) -> Any:
    """`dtype`, unless JAX would silently compute in another one: float64 needs JAX's x64 mode
    (without it every float64 array is created as float32)."""
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("opt_flax computes in float64 only with JAX's x64 mode "
                         "(jax.config.update('jax_enable_x64', True)); without it float64 would silently be float32")
    return dtype


def fill_params(model: Any, ckpt: CheckpointLoad) -> None:
    """Set every parameter of `model` from `ckpt` (Flax layout, the parameter's dtype).

    Raises:
        CheckpointError: a parameter left unloaded.
    """
    head, config = ckpt.head, ckpt.config
    table = {s.name: s for s in parameter_table(config, head)}
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    filled = set()
    for name, arr in ckpt.tensors():
        spec = table[name]
        if spec.tied_to is not None and config.tie_word_embeddings:
            continue  # the tied lm_head is the embedding itself; nothing to store
        path = _state_path(flax_path(spec, head))
        var = flat.get(path)
        if var is None:
            raise CheckpointError(f"{ckpt.source}: {name} has no parameter in {type(model).__name__} (path {path})")
        var.set_value(jnp.asarray(to_layout(arr, spec.layout("flax")), dtype=var.get_value().dtype))
        filled.add(path)
    needed = set(flat) - {_state_path(flax_path(table[n], head)) for n in ckpt.accounting.new_head}
    unfilled = sorted("/".join(map(str, p)) for p in needed - filled)
    if unfilled:
        raise CheckpointError(f"{ckpt.source}: parameters left unloaded: {', '.join(unfilled)}")
    nnx.update(model, nnx.from_flat_state(flat))
    if ckpt.accounting.new_head:  # kept from the model's own init, as torch and TF do
        logger.warning(
            "%s has no %s head; initialised %s from N(0, %s): train them before use",
            ckpt.source, head.value, ", ".join(ckpt.accounting.new_head), config.init_std,
        )


def from_pretrained(
    model_class: type,
    name_or_path: str | os.PathLike[str],
    dtype: Any = None,
    param_dtype: Any = None,
    config: OPTConfig | None = None,
    *,
    format: str | None = None,
    rngs: nnx.Rngs | None = None,
    remat: bool = False,
    revision: str | None = None,
    allow_non_finite: bool = False,
    quantize: str | None = None,
    **config_overrides: Any,
) -> Any:
    """Build `model_class` (an opt_flax model class) from a Hugging Face folder or Hub id.

    Args:
        name_or_path: a folder holding config.json and weights in any format (safetensors, bin,
            tf-h5, flax-msgpack; single or sharded), or a Hub id (`facebook/opt-125m`).
        dtype: computation dtype: None (float32), "auto" (config's torch_dtype), "float16"/"fp16",
            "bfloat16"/"bf16", "float32" or a dtype; param_dtype: storage dtype (default: `dtype`).
        format: read this format when the folder holds several (default: the first present of
            flax-msgpack, safetensors, bin, tf-h5: Flax's own file first, as Hugging Face's Flax
            loader does).
        rngs: dropout / new-head initialisation keys.
        config: use this config instead of the folder's config.json.
        revision: branch, tag or commit of a Hub id.
        allow_non_finite: load NaN/infinite weights instead of refusing them (for inspection).
        quantize: None, "int8" (weight-only) or "w8a8": inference only (`opt_flax.quantize`).
        **config_overrides: `OPTConfig` fields to change (`num_labels=3`, `dropout=0.0`, any
            config.json field), `id2label`, `label2id`, as Hugging Face's from_pretrained
            (`opt_core.config_overrides`); an unknown keyword is a TypeError naming it.
    Returns:
        The model, every parameter loaded (a task head missing from the checkpoint is initialised);
        `model.loading_info` is the `KeyAccounting` of the load.
    Raises:
        CheckpointError: missing, unexpected or misshapen tensors (all listed), hostile or
            unreadable files, non-float or non-finite weights, an untied head under a tied config.
        FileNotFoundError: no config or no weights.
    """
    folder = resolve_pretrained(name_or_path, revision)
    config = apply_config_overrides(OPTConfig.from_argument(config, folder), config_overrides,
                                    options=loader_options(from_pretrained))
    dtype = jax_dtype(dtype, config)
    param_dtype = dtype if param_dtype is None else jax_dtype(param_dtype, config)
    with open_checkpoint(folder, config, Head(model_class.head), fmt=format, prefer=LOAD_ORDER,
                         allow_non_finite=allow_non_finite) as ckpt:
        model = model_class(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
        fill_params(model, ckpt)
    model.loading_info = ckpt.accounting
    if hasattr(model, "generate"):  # generate's defaults, as Hugging Face reads them
        model.generation_config = GenerationConfig.from_pretrained(folder, config)
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
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
    formats: Iterable[str] | None = None,
) -> list[Path]:
    """Write config.json and the weights (Hugging Face torch names) to `folder`: safetensors
    (sharded above `max_shard_size`) and, with `flax_msgpack=True`, a `flax_model.msgpack` that
    Hugging Face's `FlaxOPTForCausalLM` loads; or exactly `formats` ("safetensors", "bin",
    "tf-h5", "flax-msgpack").

    Returns:
        Every written path, config.json first.
    """
    if formats is None:
        formats = [*(["safetensors"] if safetensors else []), *(["flax-msgpack"] if flax_msgpack else [])]
    # generate's defaults beside config.json, as Hugging Face writes them; one transaction for all
    return save_checkpoint(folder, canonical_tensors(model), model.config, Head(model.head), formats=formats,
                           max_shard_size=max_shard_size, architecture=type(model).__name__,
                           generation_config=model.generation_config if hasattr(model, "generate") else None)
