"""SmoothQuant for opt_torch's w8a8 (Xiao et al. 2023): calibrate per-input-channel factors on a
little text, and keep them in a file beside the checkpoint so the next load skips calibration.

s_j = max|x_j|^a / max|w_j|^(1-a) per input channel j of each Linear group (q/k/v share one input,
so one group); `opt_torch.quantize.DynamicInt8Linear` divides its input by s and multiplies the
weight's columns by s before rounding, which leaves the product unchanged in exact arithmetic.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("opt_torch")

SMOOTHING_FILE = "smoothquant.safetensors"

def _linear_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> the Linear module paths reading the same input (q/k/v share one)."""
    groups: dict[str, list[str]] = {}
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    for i, _ in enumerate(decoder.layers):
        base = f"{prefix}.layers.{i}" if prefix else f"layers.{i}"
        groups[f"{base}.self_attn.qkv"] = [f"{base}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        groups[f"{base}.self_attn.out_proj"] = [f"{base}.self_attn.out_proj"]
        groups[f"{base}.fc1"] = [f"{base}.fc1"]
        groups[f"{base}.fc2"] = [f"{base}.fc2"]
    return groups


@torch.no_grad()
def activation_ranges(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of every Linear group, over the token batches [B, T] (float model)."""
    groups = _linear_groups(model)
    first = {paths[0]: g for g, paths in groups.items()}
    ranges: dict[str, torch.Tensor] = {}
    hooks = []
    fused = []
    for layer in model.get_decoder().layers:  # run q/k/v as three modules so each is hooked
        fused.append(layer.self_attn._qkv)
        layer.self_attn._qkv = None
    try:
        for path, group in first.items():
            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], group: str = group) -> None:
                r = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                ranges[group] = torch.maximum(ranges[group], r) if group in ranges else r
            hooks.append(model.get_submodule(path).register_forward_pre_hook(hook))
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for layer, qkv in zip(model.get_decoder().layers, fused):
            layer.self_attn._qkv = qkv
    return ranges


def smoothing_factors_for(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) per input channel j, 1 where a
    channel is dead, clamped to [1e-5, 1e5]. Dividing x_j and multiplying column j of W by s_j leaves
    x W^T unchanged and balances the two ranges (alpha = 0.5: equal)."""
    x_max, w_max = x_max.float(), w_max.float()
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(1e-5, 1e5)


def smoothing_factors(model: nn.Module, ranges: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """`smoothing_factors_for` per Linear group, max|w_j| taken over every output row of the group."""
    out = {}
    for group, paths in _linear_groups(model).items():
        w_max = torch.stack([model.get_submodule(p).weight.detach().abs().amax(0).float() for p in paths]).amax(0)
        out[group] = smoothing_factors_for(ranges[group], w_max, alpha)
    return out


def calibration_batches(ids: Sequence[int], window: int, max_tokens: int = 2048) -> list[torch.Tensor]:
    """The first `max_tokens` token ids cut into windows of `window` ([1, window] each)."""
    ids = list(ids)[:max_tokens]
    return [torch.tensor([ids[i : i + window]]) for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


def calibrate_smoothing(
    model: nn.Module, text: str, tokenizer: Any, alpha: float = 0.5, max_tokens: int = 2048
) -> dict[str, torch.Tensor]:
    """SmoothQuant factors from a text: activation ranges over its first `max_tokens` tokens, in
    windows of the model's context, then `smoothing_factors`."""
    ids = tokenizer.encode(text)
    window = min(model.config.max_position_embeddings, 512)
    return smoothing_factors(model, activation_ranges(model, calibration_batches(ids, window, max_tokens)), alpha)


def save_smoothing(path: str | os.PathLike[str], factors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the factors as safetensors (one float32 vector per group), `meta` in its header."""
    from safetensors.torch import save_file

    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    save_file({k: v.contiguous().float() for k, v in factors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_smoothing(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The factors and metadata written by `save_smoothing`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def stored_or_calibrated_smoothing(
    model: nn.Module, folder: str | os.PathLike[str] | None, calibration: str | os.PathLike[str] | None,
    alpha: float = 0.5,
) -> dict[str, torch.Tensor] | None:
    """The smoothing factors for `model` loaded from `folder`.

    With `calibration` (a text file): the factors stored beside the checkpoint
    (`folder/smoothquant.safetensors`) if they came from the same text and alpha, else calibrated now
    on that text and written there (when the folder is writable) so the next load skips calibration.
    Without: the stored factors if there are any, else None (plain w8a8)."""
    stored = Path(folder) / SMOOTHING_FILE if folder is not None else None
    if calibration is None:
        if stored is not None and stored.is_file():
            return load_smoothing(stored)[0]
        return None
    calibration = Path(calibration)
    if not calibration.is_file():
        raise FileNotFoundError(f"calibration text {calibration} does not exist")
    want = {"calibration_sha256": _file_digest(calibration), "alpha": alpha}
    if stored is not None and stored.is_file():
        factors, meta = load_smoothing(stored)
        if all(meta.get(k) == v for k, v in want.items()):
            return factors
    from opt_core import OPTTokenizer

    if folder is None:
        raise ValueError("calibrating SmoothQuant factors needs the model folder (for its tokenizer)")
    tokenizer = OPTTokenizer.from_pretrained(folder)
    factors = calibrate_smoothing(model, calibration.read_text(encoding="utf-8"), tokenizer, alpha)
    if stored is not None:
        try:
            save_smoothing(stored, factors, {**want, "calibration_file": calibration.name})
        except OSError as e:
            logger.warning("could not store SmoothQuant factors beside the checkpoint (%s); they will be "
                           "recalibrated on the next load", e)
    return factors


def must_calibrate(folder: Any, calibration: Any) -> bool:
    """Whether `stored_or_calibrated_smoothing` would have to run the float model."""
    if calibration is None:
        return False
    stored = Path(folder) / SMOOTHING_FILE if folder is not None else None
    if stored is None or not stored.is_file() or not Path(calibration).is_file():
        return True
    meta = load_smoothing(stored)[1]
    return meta.get("calibration_sha256") != _file_digest(Path(calibration)) or meta.get("alpha") != 0.5

