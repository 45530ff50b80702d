"""Loading and saving Hugging Face OPT folders with PyTorch models.

Loading reads every checkpoint format through `opt_core.checkpoint.open_checkpoint` (safetensors,
`pytorch_model.bin` with no code run, `tf_model.h5`, `flax_model.msgpack`, single or sharded, a
local folder or a Hub id), which accounts for every key and refuses hostile or broken files before
a byte is copied. The model is built on uninitialised storage (`OPTPreTrainedModel.empty`) and
filled one tensor at a time, straight into a parameter's memory when its dtype and layout allow,
so peak memory stays near one copy of the weights.

`io` takes the model class as an argument and never imports `modeling` (no import cycle).

Saving writes `config.json` plus safetensors (sharded above `max_shard_size`, or other formats on
request) in Hugging Face's layout, which `transformers` loads unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opt_core import GenerationConfig, OPTConfig
from opt_core.checkpoint import DEFAULT_SHARD_BYTES, open_checkpoint, save_checkpoint
from opt_core.config_overrides import apply_config_overrides, loader_options
from opt_core.hub import resolve_pretrained
from opt_core.params import hf_name, parameter_table
from opt_torch.arrays import tensor_to_numpy
from opt_torch.loading import fill_parameters, read_parameter  # noqa: F401  (re-exported: opt_torch.io.X)

logger = logging.getLogger("opt_torch")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: Any, config: OPTConfig | None = None) -> torch.dtype:
    """A torch dtype from a dtype, a name ("float16", "bf16"...) or "auto" (the config's
    `torch_dtype`, or `dtype` in transformers 5 configs; float32 when it has none)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = config.torch_dtype if config is not None else None
        return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


# ---------------------------------------------------------------- loading
def from_pretrained(
    model_class: type,
    name_or_path: str | os.PathLike[str],
    dtype: Any = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    config: OPTConfig | None = None,
    torch_dtype: Any = None,
    tp_plan: str | None = None,
    device_mesh: Any = None,
    *,
    format: str | None = None,
    revision: str | None = None,
    allow_non_finite: bool = False,
    quantize: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    **config_overrides: Any,
) -> Any:
    """Load a Hugging Face OPT folder or Hub id into `model_class` (an `OPTPreTrainedModel` subclass).

    Args:
        name_or_path: a folder holding `config.json` and weights in any format (safetensors, bin,
            tf-h5, flax-msgpack; single or sharded), or a Hub id (`facebook/opt-125m`).
        dtype: parameter dtype: None (float32, like Hugging Face), "auto" (config's torch_dtype),
            "float16"/"fp16", "bfloat16"/"bf16", "float32", or a torch.dtype.
        device: where the parameters live (default CPU).
        attn_implementation: "eager", "sdpa" (default) or "flash_attention_2".
        config: use this config instead of the folder's config.json.
        torch_dtype: Hugging Face's old name for `dtype`.
        tp_plan: "auto" shards the model over the ranks of a torchrun job (`opt_torch.parallel`).
        device_mesh: a torch DeviceMesh to shard over instead (implies tensor parallelism).
        format: read this format when the folder holds several (default: safetensors, bin,
            tf-h5, flax-msgpack, the first present).
        revision: branch, tag or commit of a Hub id.
        allow_non_finite: load NaN/infinite weights instead of refusing them (for inspection).
        quantize: None, "int8" (weight-only), "int4" (weight-only, 4-bit groups) or "w8a8" (int8
            weights and activations): inference
            only, quantized here from the float weights (`opt_torch.quantize`).
        calibration: w8a8 only: a text file to calibrate SmoothQuant factors on (stored beside the
            checkpoint and reused); without it, factors already stored there are used if present.
        device_map: "auto", one device, or a dict of module path -> GPU index / "cpu" / "disk":
            place the model across GPUs, the CPU and disk, disk layers streamed in per forward
            (`opt_torch.offload`); `model.hf_device_map` reports the placement.
        max_memory: device -> budget ({0: "10GiB", "cpu": "1GB"}) for device_map="auto"
            (default: what is free).
        offload_folder: where layers placed on disk are written once when they cannot be read in
            place (a checkpoint not in safetensors, or stored in another dtype).
        **config_overrides: `OPTConfig` fields to change (`num_labels=3`, `dropout=0.0`, any
            config.json field), `id2label`, `label2id`, as Hugging Face's from_pretrained
            (`opt_core.config_overrides`); an unknown keyword is a TypeError naming it.
    Returns:
        The model in eval mode; `model.loading_info` is the `KeyAccounting` of the load.
    Raises:
        FileNotFoundError: no folder, config or weights.
        CheckpointError: missing, unexpected or misshapen tensors (all listed), hostile or
            unreadable files, non-float or non-finite weights, an untied head under a tied config.
    """
    folder = resolve_pretrained(name_or_path, revision)
    config = apply_config_overrides(OPTConfig.from_argument(config, folder), config_overrides,
                                    options=loader_options(from_pretrained))
    dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    if device_map is not None or max_memory is not None or offload_folder is not None:
        from opt_torch.offload import check_dispatch_options, from_pretrained_dispatched

        check_dispatch_options(device_map, device=device, quantize=quantize, tensor_parallel=tp_plan or device_mesh)
        model = from_pretrained_dispatched(
            model_class, folder, config, dtype, device_map, max_memory, offload_folder,
            attn_implementation=attn_implementation, fmt=format, allow_non_finite=allow_non_finite,
        )
        return _read_generation_config(model, folder, config).eval()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if tp_plan is not None or device_mesh is not None:
        if quantize is not None:
            raise ValueError("quantize= and tensor parallelism (tp_plan/device_mesh) do not combine")
        from opt_torch.parallel import from_pretrained_tp

        model = from_pretrained_tp(model_class, folder, config, dtype, attn_implementation, tp_plan, device_mesh)
        return _read_generation_config(model, folder, config)
    with open_checkpoint(folder, config, model_class.head, fmt=format, allow_non_finite=allow_non_finite) as ckpt:
        model = model_class.empty(config, dtype, device, attn_implementation)
        from opt_torch.quantize import quantize_loaded, quantizing_checkpoint

        fill_parameters(model, quantizing_checkpoint(model, ckpt, quantize, folder, calibration))
    # Post-load transforms (tensor parallelism, quantization, packing) apply to `model` here.
    if quantize is None and getattr(model, "pack_on_load", False):
        model.pack_weights()
    model.loading_info = ckpt.accounting
    model = _read_generation_config(model, folder, config).eval()
    return quantize_loaded(model, quantize, folder, calibration)


def _read_generation_config(model: Any, folder: Any, config: OPTConfig) -> Any:
    """generate's defaults from the folder's generation_config.json, as Hugging Face reads them."""
    if hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(folder, config)
    return model


# ---------------------------------------------------------------- saving
def canonical_tensors(model: Any) -> dict[str, np.ndarray]:
    """Canonical name -> NumPy array (canonical layout, the model's dtype) of every stored
    parameter; views of the parameters where possible (the tied LM head left out)."""
    state = model.state_dict()
    out: dict[str, np.ndarray] = {}
    for spec in parameter_table(model.config, model.head):
        if spec.tied_to is not None:
            continue  # Hugging Face re-ties on load
        out[spec.name] = tensor_to_numpy(state[hf_name(spec.name, model.head)].detach().cpu())
    return out


def save_pretrained(
    model: Any,
    folder: str | os.PathLike[str],
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
    *,
    formats: Iterable[str] | None = None,
) -> list[Path]:
    """Write `config.json` and the weights (Hugging Face names; the tied `lm_head.weight` left out
    as Hugging Face does) to `folder`, in each of `formats` (None: "safetensors"; "bin", "tf-h5",
    "flax-msgpack"); safetensors/bin are sharded above `max_shard_size` (bytes or "5GB").

    Returns:
        Every written path, config.json first.
    """
    if getattr(model, "quantization", None):
        raise ValueError("a quantized model cannot be saved; save the float model and pass quantize= when loading")
    formats = ("safetensors",) if formats is None else formats
    # generate's defaults beside config.json, as Hugging Face writes them; one transaction for all
    return save_checkpoint(folder, canonical_tensors(model), model.config, model.head, formats=formats,
                           max_shard_size=max_shard_size, architecture=type(model).__name__,
                           generation_config=getattr(model, "generation_config", None))
