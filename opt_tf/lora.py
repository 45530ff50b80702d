"""LoRA adapters for the TF backend, in PEFT's file format (see `opt_core.lora` and docs/lora.md).

    from opt_core.lora import LoraConfig
    from opt_tf import OPTForCausalLM
    from opt_tf.lora import add_adapter, save_adapter, load_adapter, merge_and_unload

    model = OPTForCausalLM.from_pretrained("folder")
    add_adapter(model, LoraConfig(r=8, lora_alpha=16), seed=0)   # base frozen, A seeded, B = 0
    train_causal_lm(model, data, args)                           # only the adapters train
    save_adapter(model, "adapter/")                              # adapter_config.json + adapter_model.safetensors
    load_adapter(OPTForCausalLM.from_pretrained("folder"), "adapter/")   # or a folder PEFT wrote
    plain = merge_and_unload(model)                              # an ordinary OPTForCausalLM

The same functions, with the same arguments, are in `opt_torch.lora` and `opt_flax.lora`. Each target
linear layer is replaced by a `LoraLinear` holding it as `base_layer` (PEFT's structure), computing
`base_layer(x) + (dropout(x) @ lora_A) @ lora_B * scaling`, with the adapter in Keras' kernel layout
(lora_A [in, r], lora_B [r, out]; PEFT's files hold the transposes). Every base variable is marked
`trainable = False`, so `model.trainable_variables`, which the Keras optimiser is built from and
`train_step` differentiates, holds the adapter only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from opt_core.lora import (
    TARGETABLE_MODULES,
    AdapterWeights,
    LoraConfig,
    init_adapter,
    linear_shapes,
    load_adapter_files,
    save_adapter_files,
)
from opt_tf.modeling import Linear

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


class LoraLinear(keras.layers.Layer):
    """A frozen linear layer plus a trainable low-rank update:
    `base_layer(x) + (dropout(x) @ lora_A) @ lora_B * scaling`, lora_A [in, r], lora_B [r, out].
    While `merged`, the update lives in `base_layer`'s kernel and is not added again. Like the other
    backends' wrappers it exposes no `kernel`: `save_pretrained` on a model that still carries an
    adapter fails (naming the weight) instead of silently writing the base without it."""

    def __init__(self, base_layer: Any, a: np.ndarray, b: np.ndarray, scaling: float, dropout: float):
        if not isinstance(base_layer, Linear):
            raise ValueError(f"LoRA needs a float opt_tf Linear base layer, got {type(base_layer).__name__}")
        super().__init__(name=f"{base_layer.name}_lora")
        self.base_layer = base_layer
        a_t = np.ascontiguousarray(np.asarray(a, np.float32).T)  # [r, in] -> [in, r]
        b_t = np.ascontiguousarray(np.asarray(b, np.float32).T)  # [out, r] -> [r, out]
        self.lora_A = self.add_weight(shape=a_t.shape, name="lora_A", initializer=keras.initializers.Constant(a_t))
        self.lora_B = self.add_weight(shape=b_t.shape, name="lora_B", initializer=keras.initializers.Constant(b_t))
        self.lora_dropout = keras.layers.Dropout(dropout) if dropout > 0 else None
        self.scaling = float(scaling)
        self.merged = False
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        # Keras hands the enclosing call's `training` flag to the nested Dropout (its call context).
        h = self.lora_dropout(x) if self.lora_dropout is not None else x
        a, b = tf.cast(self.lora_A, x.dtype), tf.cast(self.lora_B, x.dtype)
        # [..., in] -> [..., r] -> [..., out]
        return y + tf.tensordot(tf.tensordot(h, a, axes=1), b, axes=1) * self.scaling

    def delta_weight(self) -> tf.Tensor:
        """scaling * A @ B [in, out] in float32: what merging adds to the base kernel."""
        return tf.matmul(tf.cast(self.lora_A, tf.float32), tf.cast(self.lora_B, tf.float32)) * self.scaling

    def merge(self) -> None:
        """Fold the update into the base kernel (no-op when merged)."""
        if not self.merged:
            k = self.base_layer.kernel
            k.assign(tf.cast(tf.cast(k, tf.float32) + self.delta_weight(), k.dtype))
            self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base kernel (no-op when not merged)."""
        if self.merged:
            k = self.base_layer.kernel
            k.assign(tf.cast(tf.cast(k, tf.float32) - self.delta_weight(), k.dtype))
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
    for v in model.weights:
        v.trainable = False  # the base is frozen: only the adapters reach the optimiser
    for parent, leaf, wrapper in wrapped:
        setattr(parent, leaf, wrapper)
    model.lora_config = config
    return model


def add_adapter(model: Any, config: LoraConfig | None = None, seed: int = 0) -> Any:
    """Give `model` a fresh LoRA adapter (in place) and freeze everything else.

    Args:
        model: an opt_tf OPT model (any head).
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
    return {key: (np.asarray(m.lora_A, np.float32).T, np.asarray(m.lora_B, np.float32).T)
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
    (every variable trainable again) that `save_pretrained` writes as an ordinary Hugging Face
    folder. Returns `model`."""
    adapter_config(model)
    for (i, module), m in _lora_modules(model).items():
        m.merge()
        parent, leaf = _parent(_layers(model)[i], module)
        setattr(parent, leaf, m.base_layer)
    for v in model.weights:
        v.trainable = True
    model.lora_config = None
    return model
