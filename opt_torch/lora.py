"""LoRA adapters for the PyTorch backend, in PEFT's file format (see `opt_core.lora` and docs/lora.md).

    from opt_core.lora import LoraConfig
    from opt_torch import OPTForCausalLM
    from opt_torch.lora import add_adapter, save_adapter, load_adapter, merge_and_unload

    model = OPTForCausalLM.from_pretrained("folder")
    add_adapter(model, LoraConfig(r=8, lora_alpha=16), seed=0)   # base frozen, A seeded, B = 0
    train_causal_lm(model, data, args)                           # only the adapters train
    save_adapter(model, "adapter/")                              # adapter_config.json + adapter_model.safetensors
    load_adapter(OPTForCausalLM.from_pretrained("folder"), "adapter/")   # or a folder PEFT wrote
    plain = merge_and_unload(model)                              # an ordinary OPTForCausalLM

The same functions, with the same arguments, are in `opt_tf.lora` and `opt_flax.lora`. Each target
linear layer is replaced by a `LoraLinear` holding it as `base_layer` (PEFT's structure), computing
`base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update:
    `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`, lora_A [r, in], lora_B [out, r].
    While `merged`, the update lives in `base_layer`'s weight and is not added again."""

    def __init__(self, base_layer: nn.Module, a: np.ndarray, b: np.ndarray, scaling: float, dropout: float):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"LoRA needs a float nn.Linear base layer, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        r, in_features = a.shape
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, b.shape[0], bias=False, device=device)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.from_numpy(np.asarray(a, np.float32)))
            self.lora_B.weight.copy_(torch.from_numpy(np.asarray(b, np.float32)))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scaling)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + nn.functional.linear(nn.functional.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in] in float32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # [out, r] @ [r, in]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op when merged)."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (no-op when not merged)."""
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


# ---------------------------------------------------------------- the model's adapter
def _layers(model: nn.Module) -> Any:
    return model.get_decoder().layers


def _parent(layer: nn.Module, module: str) -> tuple[nn.Module, str]:
    """(the module holding `module` in a decoder layer, its attribute name)."""
    *path, leaf = TARGETABLE_MODULES[module].split(".")
    node = layer
    for part in path:
        node = getattr(node, part)
    return node, leaf


def _lora_modules(model: nn.Module) -> dict[tuple[int, str], LoraLinear]:
    found = {}
    for i, layer in enumerate(_layers(model)):
        for module in TARGETABLE_MODULES:
            parent, leaf = _parent(layer, module)
            child = getattr(parent, leaf)
            if isinstance(child, LoraLinear):
                found[(i, module)] = child
    return found


def _install(model: nn.Module, config: LoraConfig, weights: AdapterWeights) -> nn.Module:
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has a LoRA adapter; merge_and_unload() it first")
    for layer in _layers(model):
        if getattr(layer.self_attn, "qkv_proj", None) is not None:
            raise ValueError("LoRA needs float q/k/v projections; this model's were quantized into one qkv_proj")
    wrapped = []  # every wrapper is built (and its base checked) before the model changes
    for (i, module), (a, b) in weights.items():
        layer = _layers(model)[i]
        parent, leaf = _parent(layer, module)
        base = getattr(parent, leaf)
        if hasattr(base, "unpack"):
            base.unpack()  # an oneDNN-packed inference weight cannot be merged into
        wrapped.append((layer, parent, leaf, LoraLinear(base, a, b, config.scaling, config.lora_dropout)))
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen: only the adapters reach the optimiser
    for layer, parent, leaf, wrapper in wrapped:
        setattr(parent, leaf, wrapper)
        # The fused q/k/v inference path reads the base weights directly and would skip the adapter.
        layer.self_attn._qkv = None
    model.lora_config = config
    return model


def add_adapter(model: nn.Module, config: LoraConfig | None = None, seed: int = 0) -> nn.Module:
    """Give `model` a fresh LoRA adapter (in place) and freeze everything else.

    Args:
        model: an opt_torch OPT model (any head).
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


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
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


def adapter_config(model: nn.Module) -> LoraConfig:
    """The model's adapter configuration.

    Raises:
        ValueError: when the model has no adapter.
    """
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapter (add_adapter or load_adapter first)")
    return config


def adapter_weights(model: nn.Module) -> AdapterWeights:
    """{(layer, module): (A [r, in], B [out, r])} as float32 NumPy arrays."""
    adapter_config(model)
    return {key: (m.lora_A.weight.detach().float().cpu().numpy().copy(),
                  m.lora_B.weight.detach().float().cpu().numpy().copy())
            for key, m in _lora_modules(model).items()}


def save_adapter(model: nn.Module, folder: str | Path) -> list[Path]:
    """Write the adapter as PEFT does (adapter_config.json, adapter_model.safetensors with PEFT's key
    names) into `folder`; the base model is not written. Returns the paths written."""
    return save_adapter_files(folder, adapter_config(model), adapter_weights(model))


def merge_adapter(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the adapter is kept, so `unmerge_adapter` can undo it)."""
    adapter_config(model)
    for m in _lora_modules(model).values():
        m.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter` (float bases only: the subtraction is exact up to rounding)."""
    adapter_config(model)
    for m in _lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove them: `model` becomes a plain OPT model
    (every parameter trainable again) that `save_pretrained` writes as an ordinary Hugging Face
    folder. Returns `model`."""
    adapter_config(model)
    for (i, module), m in _lora_modules(model).items():
        m.merge()
        parent, leaf = _parent(_layers(model)[i], module)
        setattr(parent, leaf, m.base_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora_config = None
    return model
