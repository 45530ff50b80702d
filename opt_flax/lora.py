"""LoRA adapters for the Flax backend, in PEFT's file format (see `opt_core.lora` and docs/lora.md).

    from opt_core.lora import LoraConfig
    from opt_flax import OPTForCausalLM
    from opt_flax.lora import add_adapter, save_adapter, load_adapter, merge_and_unload

    model = OPTForCausalLM.from_pretrained("folder")
    add_adapter(model, LoraConfig(r=8, lora_alpha=16), seed=0)   # base frozen, A seeded, B = 0
    train_causal_lm(model, data, args)                           # only the adapters train
    save_adapter(model, "adapter/")                              # adapter_config.json + adapter_model.safetensors
    load_adapter(OPTForCausalLM.from_pretrained("folder"), "adapter/")   # or a folder PEFT wrote
    plain = merge_and_unload(model)                              # an ordinary OPTForCausalLM

The same functions, with the same arguments, are in `opt_torch.lora` and `opt_tf.lora`. Each target
linear layer is replaced by a `LoraLinear` holding it as `base_layer` (PEFT's structure), computing
`base_layer(x) + (dropout(x) @ lora_A) @ lora_B * scaling`. The adapter matrices are `nnx.LoRAParam`
in Flax's kernel layout (lora_A [in, r], lora_B [r, out]; PEFT's files hold the transposes); the
training loop (`opt_flax.training`) differentiates and updates only `nnx.LoRAParam` when a model has
an adapter, which is how the base stays frozen here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core.lora import (
    TARGETABLE_MODULES,
    AdapterWeights,
    LoraConfig,
    init_adapter,
    linear_shapes,
    load_adapter_files,
    save_adapter_files,
)

__all__ = [
    "LoraLinear",
    "adapter_config",
    "adapter_weights",
    "add_adapter",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "save_adapter",
    "unmerge_adapter",
]


class LoraLinear(nnx.Module):
    """A frozen linear layer plus a trainable low-rank update:
    `base_layer(x) + (dropout(x) @ lora_A) @ lora_B * scaling`, lora_A [in, r], lora_B [r, out].
    While `merged`, the update lives in `base_layer`'s kernel and is not added again."""

    def __init__(self, base_layer: Any, a: np.ndarray, b: np.ndarray, scaling: float, dropout: float):
        if not isinstance(base_layer, nnx.Linear):
            raise ValueError(f"LoRA needs a float nnx.Linear base layer, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nnx.LoRAParam(jnp.asarray(np.asarray(a, np.float32).T))  # [r, in] -> [in, r]
        self.lora_B = nnx.LoRAParam(jnp.asarray(np.asarray(b, np.float32).T))  # [out, r] -> [r, out]
        # Dropout masks come from the model's own "dropout" stream key: a fixed one here, as the rate
        # is usually 0 (the cross-backend runs); dropout follows model.train() / model.eval().
        self.lora_dropout = nnx.Dropout(dropout, deterministic=True, rngs=nnx.Rngs(dropout=0)) if dropout > 0 else None
        self.scaling = float(scaling)
        self.merged = False

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.lora_dropout(x) if self.lora_dropout is not None else x
        a, b = self.lora_A.get_value().astype(x.dtype), self.lora_B.get_value().astype(x.dtype)
        return y + ((h @ a) @ b) * self.scaling  # [..., in] @ [in, r] @ [r, out]

    def delta_weight(self) -> jnp.ndarray:
        """scaling * A @ B [in, out] in float32: what merging adds to the base kernel."""
        a, b = self.lora_A.get_value().astype(jnp.float32), self.lora_B.get_value().astype(jnp.float32)
        return (a @ b) * self.scaling  # [in, r] @ [r, out]

    def merge(self) -> None:
        """Fold the update into the base kernel (no-op when merged)."""
        if not self.merged:
            k = self.base_layer.kernel
            k.set_value((k.get_value().astype(jnp.float32) + self.delta_weight()).astype(k.get_value().dtype))
            self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base kernel (no-op when not merged)."""
        if self.merged:
            k = self.base_layer.kernel
            k.set_value((k.get_value().astype(jnp.float32) - self.delta_weight()).astype(k.get_value().dtype))
            self.merged = False


# ---------------------------------------------------------------- the model's adapter
def _layers(model: Any) -> Any:
    return model.get_decoder().layers


def _parent(layer: Any, module: str) -> tuple[Any, str]:
    """(the module holding `module` in a decoder layer, its attribute name)."""
    *path, leaf = TARGETABLE_MODULES[module].split(".")
    node = layer
    for part in path:
        node = getattr(node, part)
    return node, leaf


def _lora_modules(model: Any) -> dict[tuple[int, str], LoraLinear]:
    found = {}
    for i, layer in enumerate(_layers(model)):
        for module in TARGETABLE_MODULES:
            parent, leaf = _parent(layer, module)
            child = getattr(parent, leaf)
            if isinstance(child, LoraLinear):
                found[(i, module)] = child
    return found


def _install(model: Any, config: LoraConfig, weights: AdapterWeights) -> Any:
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has a LoRA adapter; merge_and_unload() it first")
    wrapped = []  # every wrapper is built (and its base checked) before the model changes
    for (i, module), (a, b) in weights.items():
        parent, leaf = _parent(_layers(model)[i], module)
        wrapped.append((parent, leaf, LoraLinear(getattr(parent, leaf), a, b, config.scaling, config.lora_dropout)))
    # The base is frozen by the training loop, which updates only nnx.LoRAParam once an adapter exists.
    for parent, leaf, wrapper in wrapped:
        setattr(parent, leaf, wrapper)
    model.lora_config = config
    return model


def add_adapter(model: Any, config: LoraConfig | None = None, seed: int = 0) -> Any:
    """Give `model` a fresh LoRA adapter (in place) and freeze everything else.

    Args:
        model: an opt_flax OPT model (any head).
        config: rank, alpha, dropout, target modules, rsLoRA; None for PEFT's defaults.
        seed: A's initialisation comes from `opt_core.lora.init_lora_a(seed, ...)` (identical in every
            backend); B starts at zero, so the model's output is unchanged.

    Returns:
        `model`, whose trainable parameters are now exactly the adapter's.

    Raises:
        ValueError: when the model already has an adapter or its target layers are not float linears.
    """
    config = config or LoraConfig()
    cfg = model.config
    weights = init_adapter(config, cfg.num_hidden_layers, linear_shapes(cfg.hidden_size, cfg.ffn_dim), seed)
    return _install(model, config, weights)


def load_adapter(model: Any, folder: str | Path) -> Any:
    """Apply the adapter saved in `folder` (by `save_adapter` in any backend, or by PEFT's
    `save_pretrained`) to `model`, in place; the base is frozen as by `add_adapter`.

    Raises:
        FileNotFoundError: when adapter_config.json or adapter_model.safetensors is missing.
        ValueError: naming the file and key for an unsupported setting, a missing or unknown key, or
            a shape that does not fit the model.
    """
    cfg = model.config
    config, weights = load_adapter_files(folder, cfg.num_hidden_layers, linear_shapes(cfg.hidden_size, cfg.ffn_dim))
    return _install(model, config, weights)


def adapter_config(model: Any) -> LoraConfig:
    """The model's adapter configuration.

    Raises:
        ValueError: when the model has no adapter.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapter (add_adapter or load_adapter first)")
    return config


def adapter_weights(model: Any) -> AdapterWeights:
    """{(layer, module): (A [r, in], B [out, r])} as float32 NumPy arrays."""
    adapter_config(model)
    return {key: (np.asarray(m.lora_A.get_value(), np.float32).T, np.asarray(m.lora_B.get_value(), np.float32).T)
            for key, m in _lora_modules(model).items()}


def save_adapter(model: Any, folder: str | Path) -> list[Path]:
    """Write the adapter as PEFT does (adapter_config.json, adapter_model.safetensors with PEFT's key
    names) into `folder`; the base model is not written. Returns the paths written."""
    return save_adapter_files(folder, adapter_config(model), adapter_weights(model))


def merge_adapter(model: Any) -> None:
    """Fold every adapter into its base weight (the adapter is kept, so `unmerge_adapter` can undo it)."""
    adapter_config(model)
    for m in _lora_modules(model).values():
        m.merge()


def unmerge_adapter(model: Any) -> None:
    """Undo `merge_adapter` (float bases only: the subtraction is exact up to rounding)."""
    adapter_config(model)
    for m in _lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: Any) -> Any:
    """Fold the adapters into the base weights and remove them: `model` becomes a plain OPT model
    (the training loop updates every nnx.Param again) that `save_pretrained` writes as an ordinary Hugging Face
    folder. Returns `model`."""
    adapter_config(model)
    for (i, module), m in _lora_modules(model).items():
        m.merge()
        parent, leaf = _parent(_layers(model)[i], module)
        setattr(parent, leaf, m.base_layer)
    model.lora_config = None
    return model
