"""Loading and saving Hugging Face OPT folders with PyTorch models.

Loading reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`),
`pytorch_model.bin` or sharded `.bin` (only through `torch.load(weights_only=True)`), with either key
prefix (`model.decoder.*` or `decoder.*`) and with or without `lm_head.weight`. Every key is
accounted for by `opt_core.checkpoint.account_keys` before a byte is copied. The model is built on
uninitialised storage (`modeling.empty_weights`) and filled one tensor at a
time, so peak memory stays near one copy of the weights.

Saving writes `config.json` plus safetensors (sharded above `max_shard_size`) in Hugging Face's
layout, which `transformers` loads unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opt_core import CheckpointError, Head, OPTConfig, account_keys
from opt_core.checkpoint import (
    DEFAULT_SHARD_BYTES,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    detect_format,
    formats_present,
    parse_size,
    plan_shards,
    safetensors_shapes,
    shard_file_names,
    weight_files,
    write_index,
)
from opt_core.params import hf_name, parameter_table

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
    """A torch dtype from a dtype, a name ("float16", "bf16"...) or "auto" (the config's torch_dtype)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = config.torch_dtype if config is not None else None
        return _DTYPES.get(str(name), torch.float32)
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


# ---------------------------------------------------------------- .bin reading (also for converters)
def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling errors, truncated zips, disallowed globals
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a PyTorch state_dict)")
    return state


def torch_bin_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape over PyTorch `.bin` files (memory-mapped; no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for key, t in _torch_load(Path(path)).items():
            shapes[key] = tuple(t.shape)
    return shapes


def _iter_torch_bin_tensors(
    files: Iterable[Path], keys: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    wanted = set(keys) if keys is not None else None
    for path in files:
        state = _torch_load(Path(path))
        for key in list(state):
            if wanted is None or key in wanted:
                yield key, state[key]
        del state


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU NumPy copy-free view where possible; bfloat16 becomes ml_dtypes.bfloat16."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_torch_bin(files: Iterable[Path], keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, NumPy array) one tensor at a time from PyTorch `.bin` files, loaded with
    `torch.load(weights_only=True, mmap=True)`: arbitrary pickles are refused.

    Raises:
        CheckpointError: a file that is not a weights-only state_dict.
    """
    for key, t in _iter_torch_bin_tensors(files, keys):
        yield key, tensor_to_numpy(t)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        n = int.from_bytes(prefix, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_exact(f: Any, buffer: memoryview, path: Path, key: str) -> None:
    view, got = buffer, 0
    while got < len(buffer):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{path} ends inside tensor {key}")
        got += n


_CHUNK_BYTES = 2 << 20  # bounded read buffer for tensors that cannot be read in place


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def fill_from_safetensors(files: list[Path], targets: dict[str, torch.Tensor]) -> None:
    """Read each wanted tensor of `files` straight into `targets[key]` with plain file reads.

    No mmap: the file's pages stay in the page cache instead of this process's RSS, and a tensor
    whose dtype and device already match is read into the parameter's own memory (no second copy).
    """
    for path in files:
        header, data_start = _safetensors_header(path)
        with open(path, "rb", buffering=0) as f:
            for key, info in header.items():
                target = targets.get(key)
                if target is None:
                    continue
                dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info.get('dtype')!r}")
                begin, end = info["data_offsets"]
                numel = math.prod(info["shape"])
                if end - begin != numel * dtype.itemsize:
                    raise CheckpointError(f"{path}: tensor {key} has {end - begin} bytes for shape {info['shape']}")
                f.seek(data_start + begin)
                if not numel:
                    continue
                if target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous():
                    _read_exact(f, _bytes_of(target.detach()), path, key)
                    continue
                # Another dtype, device or layout (input-major weights): through a bounded buffer.
                rows = target.view(-1) if target.dim() < 2 else target  # dim 0 chunked
                per_row = math.prod(rows.shape[1:]) * dtype.itemsize
                step = max(1, _CHUNK_BYTES // max(per_row, 1))
                for r in range(0, rows.shape[0], step):
                    buf = torch.empty((min(step, rows.shape[0] - r), *rows.shape[1:]), dtype=dtype)
                    _read_exact(f, _bytes_of(buf), path, key)
                    rows[r : r + buf.shape[0]].copy_(buf)


# ---------------------------------------------------------------- loading
def _model_class(cls_or_head: Any) -> type:
    from opt_torch.modeling import MODEL_CLASSES, OPTPreTrainedModel

    if isinstance(cls_or_head, type) and issubclass(cls_or_head, OPTPreTrainedModel):
        return cls_or_head
    return MODEL_CLASSES[Head(cls_or_head)]


def from_pretrained(
    model_class: Any,
    folder: str | os.PathLike[str],
    dtype: Any = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    config: OPTConfig | None = None,
    torch_dtype: Any = None,
    tp_plan: str | None = None,
    device_mesh: Any = None,
) -> Any:
    """Load a Hugging Face OPT folder into `model_class` (a model class or a `Head`).

    Args:
        folder: holds `config.json` and safetensors or `.bin` weights (single or sharded).
        dtype: parameter dtype (default float32, like Hugging Face); "auto" uses config.torch_dtype.
        device: where the parameters live (default CPU).
        attn_implementation: "eager", "sdpa" (default) or "flash_attention_2".
        config: use this config instead of the folder's config.json.
        torch_dtype: Hugging Face's old name for `dtype`.
        tp_plan: "auto" shards the model over the ranks of a torchrun job (`opt_torch.parallel`).
        device_mesh: a torch DeviceMesh to shard over instead (implies tensor parallelism).
    Returns:
        The model in eval mode; `model.loading_info` is the `KeyAccounting` of the load.
    Raises:
        FileNotFoundError: no folder, config or weights.
        CheckpointError: missing, unexpected or misshapen tensors (all listed), unreadable files.
    """
    from opt_torch.modeling import check_attn_implementation, empty_weights

    cls = _model_class(model_class)
    folder = Path(folder)
    check_attn_implementation(attn_implementation)
    config = config if config is not None else OPTConfig.from_pretrained(folder)
    dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if tp_plan is not None or device_mesh is not None:
        from opt_torch.parallel import from_pretrained_tp

        return from_pretrained_tp(cls, folder, config, dtype, attn_implementation, tp_plan, device_mesh)

    present = formats_present(folder) if folder.is_dir() else []
    try:
        fmt = detect_format(folder, prefer=["safetensors", "bin"])
    except FileNotFoundError:
        if present:
            raise FileNotFoundError(
                f"{folder} holds only {present} weights; convert them to safetensors first "
                f"(opt convert {folder} OUT --to safetensors)"
            ) from None
        raise
    files = weight_files(folder, fmt)
    shapes = safetensors_shapes(files) if fmt == "safetensors" else torch_bin_shapes(files)
    acc = account_keys(shapes, config, cls.head)
    acc.raise_for_errors(str(folder))

    with empty_weights(dtype, device):  # uninitialised storage, filled below tensor by tensor
        model = cls(config, attn_implementation=attn_implementation)
        model.optimize_layout(copy=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    source_to_name = {src: name for name, src in acc.mapping.items()}
    head = cls.head
    filled: set[str] = set()
    with torch.no_grad():
        if fmt == "safetensors":
            fill_from_safetensors(files, {src: params[hf_name(name, head)] for src, name in source_to_name.items()})
            filled.update(source_to_name.values())
        else:
            for key, tensor in _iter_torch_bin_tensors(files, source_to_name):
                name = source_to_name[key]
                params[hf_name(name, head)].copy_(tensor)
                filled.add(name)
                del tensor
        for name in acc.tied:
            spec = next(s for s in parameter_table(config, head) if s.name == name)
            target = params[hf_name(name, head)]
            source = params[hf_name(spec.tied_to, head)]
            if target.data_ptr() != source.data_ptr():
                target.copy_(source)
            filled.add(name)
        if acc.new_head:
            for name in acc.new_head:
                module_name = hf_name(name, head).rsplit(".", 1)[0]
                model.init_weights(model.get_submodule(module_name))
                filled.add(name)
            logger.warning(
                "%s has no %s head; initialised %s from N(0, %s) (biases 0): train them before use",
                folder, head.value, ", ".join(acc.new_head), config.init_std,
            )
    unfilled = [s.name for s in parameter_table(config, head) if s.name not in filled]
    if unfilled:  # account_keys guarantees this cannot happen; never hand out uninitialised memory
        raise CheckpointError(f"{folder}: tensors left unfilled after loading: {unfilled}")
    model.loading_info = acc
    return model.eval()


# ---------------------------------------------------------------- saving
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(
    model: Any,
    folder: str | os.PathLike[str],
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write `config.json` and safetensors weights (Hugging Face names; the tied `lm_head.weight`
    left out as Hugging Face does) to `folder`; shards plus `model.safetensors.index.json` when the
    weights exceed `max_shard_size` (bytes or "5GB"). Returns the written weight files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: OPTConfig = model.config
    head = model.head
    extra = dict(config.extra)
    extra["architectures"] = [type(model).__name__]
    config.replace(torch_dtype=_dtype_name(model.dtype), extra=extra).save_pretrained(folder)

    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for spec in parameter_table(config, head):
        if spec.tied_to is not None:
            continue  # Hugging Face re-ties on load
        t = state[hf_name(spec.name, head)].detach().cpu()
        # Fused q/k/v parameters are views of one buffer; safetensors wants each tensor on its own.
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        tensors[hf_name(spec.name, head)] = t
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = shard_file_names(SAFETENSORS, len(shards))
    for old in folder.glob("model-*-of-*.safetensors"):
        old.unlink()  # stale shards of an earlier save would confuse a reader
    written: list[Path] = []
    for shard, name in zip(shards, names):
        tmp = folder / f".{name}.tmp"
        save_file({k: tensors[k] for k in shard}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
        written.append(folder / name)
    index = folder / SAFETENSORS_INDEX
    if len(shards) > 1:
        if (folder / SAFETENSORS).exists():
            (folder / SAFETENSORS).unlink()
        write_index(index, {k: n for shard, n in zip(shards, names) for k in shard}, sum(sizes.values()))
        written.append(index)
    elif index.exists():
        index.unlink()
    return written
