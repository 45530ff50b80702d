"""Loading and saving Hugging Face OPT folders with the TensorFlow models.

Loading reads every checkpoint format through `opt_core.checkpoint.open_checkpoint` (safetensors,
`pytorch_model.bin` with no code run, `tf_model.h5`, `flax_model.msgpack`, single or sharded, a
local folder or a Hub id), which accounts for every key and refuses hostile or broken files before
a weight is assigned; tensors then stream one at a time into their variables. Float16 and
bfloat16 models are built under that Keras dtype policy (variables and compute in that dtype).

`io` takes the model class as an argument and never imports `modeling` (no import cycle).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from opt_core import CheckpointError, GenerationConfig, OPTConfig
from opt_core.checkpoint import DEFAULT_SHARD_BYTES, CheckpointLoad, open_checkpoint, save_checkpoint
from opt_core.config_overrides import apply_config_overrides, loader_options
from opt_core.formats import dtype_name, resolve_dtype
from opt_core.hub import resolve_pretrained
from opt_core.layout import from_layout, to_layout
from opt_core.params import parameter_table
from opt_core.quantization import check_quantize_dtype

logger = logging.getLogger(__name__)

# Formats looked for when a folder holds several: safetensors, then TF's own file, as Hugging Face's TF loader.
LOAD_ORDER = ("safetensors", "tf-h5", "bin", "flax-msgpack")


def keras_dtype(dtype: Any, config: OPTConfig | None = None) -> str:
    """"float32", "float16" or "bfloat16" from a name, NumPy/TF dtype, None (float32) or "auto"
    (the config's torch_dtype).

    Raises:
        ValueError: an unknown dtype, or float64 (the TF models compute in 16/32-bit floats).
    """
    if dtype is None:
        return "float32"
    if isinstance(dtype, str) and dtype == "auto":
        dtype = (config.torch_dtype if config is not None else None) or "float32"
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(getattr(dtype, "name", None), str):  # tf.DType, np.dtype
        name = dtype.name
    else:
        name = np.dtype(dtype).name
    result = dtype_name(resolve_dtype(name))  # type: ignore[arg-type]
    if result not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"opt_tf builds float32, float16 or bfloat16 models, not {dtype!r}")
    return result


def fill_variables(model: Any, ckpt: CheckpointLoad) -> None:
    """Assign every tensor of `ckpt` to `model`'s variables (TF layout, the variable's dtype).

    Raises:
        CheckpointError: a parameter left unfilled.
    """
    variables = model.named_weights()
    specs = {s.name: s for s in parameter_table(ckpt.config, ckpt.head)}
    filled: set[str] = set()
    for name, arr in ckpt.tensors():
        filled.add(name)
        if name not in variables:  # a separate head is a variable; a tied one is the embedding
            continue
        var = variables[name]
        var.assign(to_layout(arr, specs[name].layout("tf")).astype(var.dtype))
    filled.update(ckpt.accounting.tied)
    if ckpt.accounting.new_head:
        filled.update(ckpt.accounting.new_head)
        logger.warning(
            "%s has no %s head; initialised %s from N(0, %s): train them before use",
            ckpt.source, ckpt.head.value, ", ".join(ckpt.accounting.new_head), ckpt.config.init_std,
        )
    unfilled = [n for n in specs if n not in filled]
    if unfilled:
        raise CheckpointError(f"{ckpt.source}: tensors left unfilled after loading: {unfilled}")


def from_pretrained(
    model_class: type,
    name_or_path: str | os.PathLike[str],
    dtype: Any = None,
    config: OPTConfig | None = None,
    *,
    format: str | None = None,
    revision: str | None = None,
    allow_non_finite: bool = False,
    quantize: str | None = None,
    **config_overrides: Any,
) -> Any:
    """Load a Hugging Face OPT folder or Hub id into `model_class` (an `OPTPreTrainedModel` subclass).

    Args:
        name_or_path: a folder holding `config.json` and weights in any format (safetensors, bin,
            tf-h5, flax-msgpack; single or sharded), or a Hub id (`facebook/opt-125m`).
        dtype: None/"float32", "float16"/"fp16", "bfloat16"/"bf16", or "auto" (config's
            torch_dtype): the Keras dtype policy of the model (variables and compute).
        config: use this config instead of the folder's config.json.
        format: read this format when the folder holds several (default: the first present of
            safetensors, tf-h5, bin, flax-msgpack, as Hugging Face's TF loader orders them).
        revision: branch, tag or commit of a Hub id.
        allow_non_finite: load NaN/infinite weights instead of refusing them (for inspection).
        quantize: None, "int8" (weight-only) or "w8a8": inference only (`opt_tf.quantize`).
        **config_overrides: `OPTConfig` fields to change (`num_labels=3`, `dropout=0.0`, any
            config.json field), `id2label`, `label2id`, as Hugging Face's from_pretrained
            (`opt_core.config_overrides`); an unknown keyword is a TypeError naming it.
    Returns:
        The model; `model.loading_info` is the `KeyAccounting` of the load.
    Raises:
        FileNotFoundError: no folder, config or readable weights.
        CheckpointError: missing, unexpected or misshapen tensors (all listed), hostile or
            unreadable files, non-float or non-finite weights, an untied head under a tied config.
        ValueError: a dtype the TF models cannot use (float64).
    """
    folder = resolve_pretrained(name_or_path, revision)
    config = apply_config_overrides(OPTConfig.from_argument(config, folder), config_overrides,
                                    options=loader_options(from_pretrained))
    policy = keras_dtype(dtype, config)
    check_quantize_dtype(quantize, "tf", policy)
    with open_checkpoint(folder, config, model_class.head, fmt=format, prefer=LOAD_ORDER,
                         allow_non_finite=allow_non_finite) as ckpt:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            model = model_class(config)
        finally:
            keras.config.set_dtype_policy(previous)
        fill_variables(model, ckpt)
    model.loading_info = ckpt.accounting
    if hasattr(model, "generate"):  # generate's defaults, as Hugging Face reads them
        model.generation_config = GenerationConfig.from_pretrained(folder, config)
    from opt_tf.quantize import quantize_loaded

    return quantize_loaded(model, quantize)


def canonical_tensors(model: Any) -> dict[str, np.ndarray]:
    """Canonical name -> NumPy array in canonical (torch) layout for every stored parameter (the
    tied LM head left out, as Hugging Face does)."""
    specs = {s.name: s for s in parameter_table(model.config, model.head)}
    out = {}
    for name, var in model.named_weights().items():
        arr = np.asarray(var.numpy())
        if arr.dtype.kind == "V" or str(var.dtype) == "bfloat16":
            arr = arr.view(resolve_dtype("bfloat16"))
        out[name] = from_layout(arr, specs[name].layout("tf"))
    return out


state_dict = canonical_tensors  # the older name


def save_pretrained(
    model: Any,
    folder: str | os.PathLike[str],
    tf_h5: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
    *,
    formats: Iterable[str] | None = None,
) -> list[Path]:
    """Write `config.json` and the weights (Hugging Face torch names) to `folder`: safetensors
    (sharded above `max_shard_size`), plus a `tf_model.h5` Hugging Face's TF classes load when
    `tf_h5` is True, or exactly `formats` ("safetensors", "bin", "tf-h5", "flax-msgpack").

    Returns:
        Every written path, config.json first.
    """
    formats = list(formats) if formats is not None else ["safetensors", *(["tf-h5"] if tf_h5 else [])]
    gen = None
    if hasattr(model, "generate"):  # generate's defaults beside config.json, as Hugging Face writes them
        gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    return save_checkpoint(folder, canonical_tensors(model), model.config, model.head, formats=formats,
                           max_shard_size=max_shard_size, architecture=type(model).__name__, generation_config=gen)
