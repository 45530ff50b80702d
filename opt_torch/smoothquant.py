"""SmoothQuant for opt_torch's w8a8 (Xiao et al. 2023): calibrate per-input-channel factors on a
little text, and keep them in a file beside the checkpoint so the next load skips calibration.

s_j = max|x_j|^a / max|w_j|^(1-a) per input channel j of each Linear group (q/k/v share one input,
so one group); `opt_torch.quantize.DynamicInt8Linear` divides its input by s and multiplies the
weight's columns by s before rounding, which leaves the product unchanged in exact arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opt_core.data import check_text_file, tokenize_file, tokenize_text
from opt_core.quantization import SMOOTHING_FILE
from opt_core.user_cache import user_cache_dir

logger = logging.getLogger("opt_torch")

# Every factor calibration produces lies here (the clamp of `smoothing_factors_for`); a file with
# one outside was not written by calibration, and applying it would scale activations and weights
# by up to that much (factors of 1e30 took the bundled model's perplexity from 445 to 6225).
SMOOTHING_RANGE = (1e-5, 1e5)

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
    channel is dead, clamped to SMOOTHING_RANGE. Dividing x_j and multiplying column j of W by s_j
    leaves x W^T unchanged and balances the two ranges (alpha = 0.5: equal)."""
    x_max, w_max = x_max.float(), w_max.float()
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(*SMOOTHING_RANGE)


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
    model: nn.Module, text: str | os.PathLike[str], tokenizer: Any, alpha: float = 0.5, max_tokens: int = 2048
) -> dict[str, torch.Tensor]:
    """SmoothQuant factors from a text (a str, or a text file's path, read and tokenized only as far as
    `max_tokens` needs): activation ranges over its first `max_tokens` tokens, in windows of the
    model's context, then `smoothing_factors`."""
    if isinstance(text, str):
        ids = [tokenizer.bos_token_id, *tokenize_text(text, tokenizer, max_tokens - 1).tolist()]
    else:
        ids = [tokenizer.bos_token_id, *tokenize_file(text, tokenizer, max_tokens - 1, "calibration text").tolist()]
    window = min(model.config.max_position_embeddings, 512)
    return smoothing_factors(model, activation_ranges(model, calibration_batches(ids, window, max_tokens)), alpha)


def save_smoothing(path: str | os.PathLike[str], factors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the factors as safetensors (one float32 vector per group), `meta` in its header."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous().float() for k, v in factors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_smoothing(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The factors and metadata of a smoothing file (unchecked: see `check_smoothing`). The file must
    be inside its model folder: a link leaving the folder is refused, as for every weight file.

    Raises:
        ValueError: the file is a link out of its folder, not a readable safetensors file, or its
            metadata is not JSON (named).
    """
    from safetensors import SafetensorError, safe_open

    from opt_core.formats.base import CheckpointError, check_regular_file
    from opt_core.safe_files import check_inside, parse_json

    check_regular_file(check_inside(path, Path(path).parent, CheckpointError, "smoothing file"))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: parse_json(v.encode(), f"SmoothQuant factors {path}: metadata {_short(k)}", ValueError)
                    for k, v in (f.metadata() or {}).items()}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError) as e:
        raise ValueError(f"SmoothQuant factors {path} are not a readable safetensors file ({_short(str(e))})") from None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sha256_of_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


_WEIGHT_DIGESTS: dict[tuple[Any, ...], str] = {}


def weights_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 of the weight files `from_pretrained` reads in `folder` (their names and bytes, in
    order), memoised per process by (path, size, mtime) of each file."""
    from opt_core.formats.files import detect_format, resolve_files

    files = resolve_files(folder, detect_format(folder))[0]
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _WEIGHT_DIGESTS:
        _WEIGHT_DIGESTS[key] = _sha256_of_files(files)
    return _WEIGHT_DIGESTS[key]


def text_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a calibration text file (checked to be a regular file first: never opens a FIFO)."""
    return _sha256_of_files([check_text_file(path, "calibration text")])


def smoothing_cache_path(weights_digest: str, text_digest: str, alpha: float) -> Path:
    """Where factors for these weights, this text and alpha are cached: the user's cache folder
    (`opt_core.user_cache`, `$OPT_CACHE`), never the model folder or the installed package."""
    return user_cache_dir("smoothquant") / f"{weights_digest[:32]}-{text_digest[:32]}-a{alpha:g}.safetensors"


def check_smoothing(
    model: nn.Module, factors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike[str],
    want: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """`factors` if they fit `model` and were calibrated for what `want` names; else a ValueError
    naming the file and the first wrong tensor or field.

    Checked: one float32 vector per Linear group of the model, no more and no fewer, of the group's
    input width; every value finite, positive and within SMOOTHING_RANGE; the metadata's
    `weights_sha256` (and `calibration_sha256`, `alpha` when in `want`) equal to `want`'s.
    """
    where = f"SmoothQuant factors {path}"
    for name, value in want.items():
        got = meta.get(name)
        if got is None:
            raise ValueError(f"{where} lack {name} in their metadata (written by an older version or by hand); "
                             "delete the file and calibrate again with a calibration text")
        if got != value:
            what = {"weights_sha256": "other weights", "calibration_sha256": "another calibration text"}.get(name, name)
            raise ValueError(f"{where} were calibrated for {what} ({name} {_short(str(got), 20)}, expected "
                             f"{_short(str(value), 20)}); delete the file or calibrate again")
    groups = _linear_groups(model)
    unexpected = sorted(set(factors) - set(groups))
    missing = [g for g in groups if g not in factors]
    if unexpected or missing:
        names = (f"unexpected tensor {_short(unexpected[0])}" if unexpected else f"no tensor {missing[0]}")
        raise ValueError(f"{where} do not fit this model: {names} "
                         f"({len(unexpected)} unexpected, {len(missing)} missing)")
    lo, hi = SMOOTHING_RANGE
    for group in groups:
        # from the config: after a layer-by-layer quantizing load the float Linears are gone
        s, width = factors[group], model.config.ffn_dim if group.endswith(".fc2") else model.config.hidden_size
        if s.dtype != torch.float32 or tuple(s.shape) != (width,):
            raise ValueError(f"{where}: tensor {group} is {str(s.dtype).replace('torch.', '')} {list(s.shape)}; "
                             f"expected float32 [{width}]")
        bad = ~(torch.isfinite(s) & (s >= lo) & (s <= hi))
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"{where}: tensor {group} holds {float(s[j]):g} at channel {j}; factors must be "
                             f"finite and within [{lo:g}, {hi:g}]")
    return factors


def _checked_file(model: nn.Module, path: Path, want: dict[str, Any]) -> dict[str, torch.Tensor]:
    factors, meta = load_smoothing(path)
    return check_smoothing(model, factors, meta, path, want)


def _sources(folder: Any, calibration: Any, alpha: float) -> tuple[Path | None, Path | None, dict[str, Any]]:
    """(factors shipped beside the weights or None, the cache file for this text or None, what both
    must be bound to)."""
    beside = Path(folder) / SMOOTHING_FILE if folder is not None else None
    if beside is not None and not beside.is_file():
        beside = None
    if beside is None and calibration is None:
        return None, None, {}
    if folder is None:
        raise ValueError("SmoothQuant factors need the model folder (its weights and tokenizer)")
    want: dict[str, Any] = {"weights_sha256": weights_sha256(folder)}
    if calibration is None:
        return beside, None, want
    want.update(calibration_sha256=text_sha256(calibration), alpha=alpha)
    return beside, smoothing_cache_path(want["weights_sha256"], want["calibration_sha256"], alpha), want


def stored_or_calibrated_smoothing(
    model: nn.Module, folder: str | os.PathLike[str] | None, calibration: str | os.PathLike[str] | None,
    alpha: float = 0.5,
) -> dict[str, torch.Tensor] | None:
    """The smoothing factors for `model` loaded from `folder`, every one checked (`check_smoothing`).

    Without `calibration`: the factors shipped beside the weights (`folder/smoothquant.safetensors`)
    when there are any, bound to these weights; else None (plain w8a8).
    With `calibration` (a text file): factors for these weights, that text and alpha from beside the
    weights, else from the user's cache (`smoothing_cache_path`), else calibrated now on the text's
    first 2,048 tokens and written to the cache, so the next load with the same text skips
    calibration. Nothing is ever written into the model folder.

    Raises:
        ValueError: factors that are malformed, out of range or calibrated for other weights or
            another text (named); a calibration text that is not a readable UTF-8 regular file.
    """
    beside, cached, want = _sources(folder, calibration, alpha)
    if calibration is None:
        return _checked_file(model, beside, want) if beside is not None else None
    if beside is not None:
        factors, meta = load_smoothing(beside)
        if meta.get("calibration_sha256") == want["calibration_sha256"] and meta.get("alpha") == alpha:
            return check_smoothing(model, factors, meta, beside, want)
    assert cached is not None
    if cached.is_file():
        return _checked_file(model, cached, want)
    from opt_core import OPTTokenizer

    tokenizer = OPTTokenizer.from_pretrained(folder)  # type: ignore[arg-type]
    factors = calibrate_smoothing(model, Path(calibration), tokenizer, alpha)
    try:
        save_smoothing(cached, factors, {**want, "calibration_file": Path(calibration).name})
    except OSError as e:
        logger.warning("could not cache the SmoothQuant factors in %s (%s); they will be recalibrated on the "
                       "next load", cached.parent, e)
    return factors


def must_calibrate(folder: Any, calibration: Any, alpha: float = 0.5) -> bool:
    """Whether `stored_or_calibrated_smoothing` would have to run the float model (no factors for
    these weights and this text beside the weights or in the cache)."""
    if calibration is None:
        return False
    beside, cached, want = _sources(folder, calibration, alpha)
    if beside is not None:
        meta = load_smoothing(beside)[1]
        if meta.get("calibration_sha256") == want["calibration_sha256"] and meta.get("alpha") == alpha:
            return False
    return cached is None or not cached.is_file()
