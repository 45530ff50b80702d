"""Models larger than memory: `from_pretrained(path, device_map=..., max_memory=..., offload_folder=...)`.

The placement (which module on which GPU, on the CPU or on disk) is planned framework-free by
`opt_core.placement` with Accelerate's semantics; this module applies it to a torch model:

- Modules on a GPU get fresh storage there and are filled from the checkpoint; modules on the CPU
  are filled as in an ordinary load. Each runs where it lives.
- Every weight keeps the checkpoint's [out, in] layout (q/k/v fused into one buffer), so a disk
  layer's tensors are read straight into their memory. A decoder layer on disk keeps its
  parameters (names, layout, fused q/k/v buffer) but no storage. A forward pre-hook gives it
  storage on the main device (the token embedding's: the CPU, or the first GPU) and reads its
  tensors from disk; a forward hook takes the storage back afterwards. The storage is handed from
  one streamed layer to the next (they are all the same size), so memory holds the resident
  modules plus one streamed layer, which the "auto" plan keeps room for inside `max_memory`.
- "From disk" means the checkpoint's own safetensors files, read in place at the tensors' offsets
  (no copy is written), when the checkpoint is safetensors in the model's dtype. Otherwise (bin,
  tf-h5, msgpack, or a dtype cast) the disk layers are written once, in the model's dtype, to
  `offload_folder/opt-offload.safetensors` and streamed from there. The reads are plain file reads
  rather than a memory map, because touched pages of a mapped file count towards the process's
  resident set (see `opt_core.formats.safetensors`), which would defeat `max_memory`.
- With more than one execution device, pre-hooks move each module's inputs to its device and the
  outputs of the modules outside the layers (and of the last layer) come back to the main device,
  so the unchanged model code runs across devices, as Accelerate's hooks do.

Inference only: streamed parameters are refilled from disk each forward, so training them would
lose every update.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from opt_core import OPTConfig
from opt_core.checkpoint import CheckpointLoad, open_checkpoint
from opt_core.formats import Scratch
from opt_core.formats.base import Reader, TensorPlan
from opt_core.formats.safetensors import SafetensorsReader, SafetensorsWriter
from opt_core.params import hf_name, parameter_table
from opt_core.placement import (
    AUTO_MAPS,
    DISK,
    Device,
    Placement,
    format_bytes,
    module_key,
    parse_max_memory,
    plan_placement,
)
from opt_torch.arrays import tensor_to_numpy
from opt_torch.loading import fill_parameters, read_parameter

OFFLOAD_FILE = "opt-offload.safetensors"
# transformers keeps 10% of each GPU's free memory out of "auto" for activations and the CUDA context.
_GPU_FREE_FRACTION = 0.9


def check_dispatch_options(device_map: Any, *, device: Any, quantize: Any, tensor_parallel: Any) -> None:
    """Refuse what does not combine with `device_map` (one line each)."""
    if device_map is None:
        raise ValueError("max_memory= and offload_folder= apply to a device map: pass device_map='auto' (or a dict)")
    if device is not None:
        raise ValueError("pass either device= or device_map=, not both (device_map='cpu' or 0 places everything)")
    if quantize is not None:
        raise ValueError("quantize= and device_map= do not combine; load with one or the other")
    if tensor_parallel:
        raise ValueError("tensor parallelism (tp_plan/device_mesh) and device_map= do not combine")


def default_max_memory() -> dict[Device, int]:
    """What "auto" may use without `max_memory`: 90% of each GPU's free memory, and the CPU's
    available memory (as Accelerate and transformers measure them)."""
    out: dict[Device, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[i] = int(torch.cuda.mem_get_info(i)[0] * _GPU_FREE_FRACTION)
    out["cpu"] = _available_cpu_memory()
    return out


def _available_cpu_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError("cannot tell how much memory is available here; pass max_memory={'cpu': SIZE}")


def _check_gpus(devices: list[tuple[str, Device]]) -> None:
    """Refuse GPU placements this machine cannot honour, naming the first (what, device)."""
    for what, device in devices:
        if not isinstance(device, int):
            continue
        if not torch.cuda.is_available():
            raise ValueError(
                f"{what} GPU {device}, but CUDA is not available here (torch.cuda.is_available() is False); "
                "place the model on 'cpu' and 'disk'"
            )
        if device >= torch.cuda.device_count():
            raise ValueError(f"{what} GPU {device}, but this machine has {torch.cuda.device_count()} GPU(s)")


def _torch_device(device: Device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (tuples, lists, dicts, dataclasses such as the attention
    mask) on `device`; other objects (the KV cache, whose tensors stay with their layer) as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


# ---------------------------------------------------------------- the disk layers' source
class DiskWeights:
    """Where the disk layers' tensors are read from on every forward: a safetensors reader and
    canonical name -> key. Offers what `opt_torch.loading.read_parameter` reads through."""

    def __init__(self, reader: Reader, keys: dict[str, str], where: str):
        self.reader, self.keys, self.where = reader, keys, where
        self.scratch = Scratch()

    def dtype(self, name: str) -> np.dtype:
        return self.reader.dtype(self.keys[name])

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self.reader.read(self.keys[name], out)

    def get_slice(self, name: str) -> Any:
        return self.reader.get_slice(self.keys[name])


def disk_weights(ckpt: CheckpointLoad, names: list[str], dtype: torch.dtype,
                 offload_folder: str | os.PathLike[str] | None) -> DiskWeights:
    """The source of the disk layers `names`: the checkpoint's safetensors files in place when they
    hold the tensors in `dtype`, else a file written once to `offload_folder`. Every tensor is
    checked for NaN/infinity here, once (unless the load allows them), not on each forward.

    Raises:
        ValueError: the checkpoint cannot be read in place and no `offload_folder` was given.
        CheckpointError: a non-finite tensor (naming it and its file).
    """
    want = tensor_to_numpy(torch.empty(0, dtype=dtype)).dtype
    scratch = Scratch()
    specs = {s.name: s for s in parameter_table(ckpt.config, ckpt.head)}
    cast = [n for n in names if ckpt.dtype(n) != want]
    if ckpt.fmt == "safetensors" and not cast:
        if not ckpt.allow_non_finite:
            for name in names:  # ckpt.read checks; the buffer is reused, so this holds one tensor
                ckpt.read(name, out=scratch.array(specs[name].shape, ckpt.dtype(name)))
        files = sorted({ckpt.reader.where(ckpt.key(n)) for n in names})
        return DiskWeights(ckpt.reader, {n: ckpt.key(n) for n in names}, ", ".join(files))
    if offload_folder is None:
        why = (f"stored as {ckpt.dtype(cast[0])} while the model loads as {want}" if ckpt.fmt == "safetensors"
               else f"in the {ckpt.fmt} format, not safetensors")
        layers = sorted({n.split(".")[2] for n in names}, key=int)
        raise ValueError(
            f"device_map puts decoder layers {', '.join(layers)} on disk, but {ckpt.source} is {why}, so they "
            "cannot be read in place: pass offload_folder=DIR to write them there once (or convert the "
            f"checkpoint: opt convert SRC DST --to safetensors --dtype {str(dtype).removeprefix('torch.')})"
        )
    folder = Path(offload_folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = [TensorPlan(specs[n], n, want) for n in names]
    writer = SafetensorsWriter(folder, plan, ckpt.config, ckpt.head, None, base_name=OFFLOAD_FILE)
    try:
        for n in names:  # one tensor at a time: read (checked), cast, written at its offset
            arr = ckpt.read(n, out=scratch.array(specs[n].shape, ckpt.dtype(n)))
            writer.write(n, arr.astype(want, copy=False))
        (path,) = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return DiskWeights(SafetensorsReader(path, files=[path]), {n: n for n in names}, str(path))


# ---------------------------------------------------------------- streaming one layer
class _StoragePool:
    """Storage handed from one streamed layer to the next: the layers are all the same size, so
    after the first forward no streamed layer allocates, and memory holds at most one of them."""

    def __init__(self) -> None:
        self.free: dict[tuple[torch.device, int], list[torch.UntypedStorage]] = {}

    def take(self, device: torch.device, nbytes: int) -> torch.UntypedStorage:
        kept = self.free.get((device, nbytes))
        if kept:
            return kept.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()

    def give(self, device: torch.device, storage: torch.UntypedStorage) -> None:
        self.free.setdefault((device, storage.nbytes()), []).append(storage)


class StreamedModule:
    """A decoder layer whose weights live on disk: storage and contents only during its forward.

    The layer's tensors are its parameters plus the fused q/k/v buffer they are views of
    (`OPTAttention._qkv`, found by attribute: it is not a parameter). Tensors sharing a storage
    keep sharing one, with their offsets and strides (the optimised layout), so the layer runs the
    same kernels on the same layout as when it is fully in memory.
    """

    def __init__(self, module: nn.Module, params: list[tuple[str, torch.Tensor]], device: torch.device,
                 source: DiskWeights, pool: _StoragePool):
        self.params, self.device, self.source, self.pool = params, device, source, pool
        tensors: dict[int, torch.Tensor] = {id(p): p for p in module.parameters()}
        for m in module.modules():
            for t in getattr(m, "_qkv", None) or ():
                if t is not None:
                    tensors[id(t)] = t
        groups: dict[int, list[tuple[torch.Tensor, int, tuple[int, ...], tuple[int, ...]]]] = {}  # by storage
        sizes: dict[int, int] = {}
        for t in tensors.values():
            storage = t.untyped_storage()
            member = (t, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()))
            groups.setdefault(storage.data_ptr(), []).append(member)
            sizes[storage.data_ptr()] = storage.nbytes()
        self.groups = [(sizes[k], members) for k, members in groups.items()]
        self.nbytes = sum(sizes.values())
        self.release()  # the uninitialised storage the model was built with goes back now

    @torch.no_grad()
    def load(self) -> None:
        """Give every tensor storage on the execution device and read the weights into it."""
        for nbytes, members in self.groups:
            storage = self.pool.take(self.device, nbytes)
            for t, offset, shape, stride in members:
                t.set_(storage, offset, shape, stride)
        for name, target in self.params:
            read_parameter(target, self.source, name, self.source.scratch)

    @torch.no_grad()
    def release(self) -> None:
        """Take the storage back (to the pool); the tensors are left empty until the next `load`."""
        for _, members in self.groups:
            storage = members[0][0].untyped_storage()
            for t, *_ in members:
                t.set_(torch.empty(0, dtype=t.dtype, device=t.device).untyped_storage(), 0, (0,), (1,))
            if storage.nbytes():
                self.pool.give(self.device, storage)


def _refuse_state_dict(key: str, *_: Any) -> None:
    """A disk layer's parameters are empty between forwards: saving them would write nothing."""
    raise ValueError(
        f"{key} is offloaded to disk (device_map) and holds no weights between forwards, so the model has no "
        "state_dict to save or export: load it without device_map for that"
    )


@dataclasses.dataclass
class Dispatch:
    """What `model.offload` holds: the placement, the disk source and the streamed layers."""

    placement: Placement
    source: DiskWeights | None
    streamed: list[StreamedModule]


def dispatch(model: Any, placement: Placement, source: DiskWeights | None) -> Dispatch:
    """Apply `placement` to `model` (built by `empty()` on the CPU, not yet filled): GPU modules get
    storage there, disk layers become `StreamedModule`s, and hooks move data between devices.
    Returns what `model.offload` keeps."""
    head = model.head
    params = dict(model.named_parameters(remove_duplicate=False))
    main = _torch_device(placement.main_device)
    runs_on = {u.name: main if placement.devices[u.name] == DISK else _torch_device(placement.devices[u.name])
               for u in placement.units}
    for u in placement.units:
        if isinstance(placement.devices[u.name], int):
            model.get_submodule(module_key(u.name, head)).to_empty(device=runs_on[u.name])
    model.tie_weights()  # to_empty gave the embedding a new parameter; the tied head follows it
    params = dict(model.named_parameters(remove_duplicate=False))
    pool = _StoragePool()
    streamed = []
    for u in placement.offloaded:
        assert source is not None
        module = model.get_submodule(module_key(u.name, head))
        s = StreamedModule(module, [(n, params[hf_name(n, head)]) for n in u.params], runs_on[u.name], source, pool)
        module.register_forward_pre_hook(lambda _m, _args, s=s: s.load())
        module.register_forward_hook(lambda _m, _args, _out, s=s: s.release(), always_call=True)
        module.register_state_dict_pre_hook(partial(_refuse_state_dict, module_key(u.name, head)))
        streamed.append(s)
    if len(set(runs_on.values())) > 1:
        layers = [u for u in placement.units if u.layer is not None]
        for u in placement.units:
            module = model.get_submodule(module_key(u.name, head))
            device = runs_on[u.name]
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, device=device: (_to(args, device), _to(kwargs, device)), with_kwargs=True
            )
            if u.layer is None or u is layers[-1]:
                module.register_forward_hook(lambda _m, _args, out: _to(out, main))
    return Dispatch(placement, source, streamed)


def _empty_plain(model_class: Any, config: OPTConfig, dtype: torch.dtype, attn_implementation: str) -> Any:
    """The model on uninitialised CPU storage with every weight [out, in], as the checkpoint
    stores it (q/k/v fused into one [3C, C] buffer), so a disk layer's tensors are read straight
    into their memory. `OPTPreTrainedModel.empty` may choose the input-major layout instead, which
    would cost a transposing copy of every streamed weight on every forward: on a 1.3b-sized
    [8192, 2048] float32 weight that copy took 220 ms at one thread, several times the read. The
    kernel stays the one measured fastest for plain weights; no oneDNN packing (packed weights
    are opaque tensors with no storage to refill)."""
    from opt_torch.kernels import choose_linear
    from opt_torch.layout import empty_weights

    choice = choose_linear(config.hidden_size, config.ffn_dim, dtype)
    with empty_weights(dtype, "cpu"):
        model = model_class(config, attn_implementation=attn_implementation)
        model.optimize_layout(copy=False, input_major=False, kernel="onednn" if choice.startswith("onednn") else "aten")
    return model


def from_pretrained_dispatched(
    model_class: Any,
    folder: Path,
    config: OPTConfig,
    dtype: torch.dtype,
    device_map: Any,
    max_memory: dict[Any, Any] | None,
    offload_folder: str | os.PathLike[str] | None,
    *,
    attn_implementation: str = "sdpa",
    fmt: str | None = None,
    allow_non_finite: bool = False,
) -> Any:
    """`from_pretrained` with a device map (see the module docstring); the model has
    `hf_device_map` (Hugging Face module path -> GPU index, "cpu" or "disk") and `offload`.

    Raises:
        ValueError: an unknown device, a budget that cannot hold the modules kept in memory, a GPU
            placement without CUDA, disk layers that cannot be read in place without `offload_folder`.
        CheckpointError, FileNotFoundError: as any load.
    """
    head = model_class.head
    budgets = None
    auto = isinstance(device_map, str) and device_map in AUTO_MAPS
    if max_memory is not None and not auto:
        raise ValueError(f"max_memory= budgets device_map='auto'; with device_map={device_map!r} it would be ignored")
    if max_memory is not None:
        budgets = parse_max_memory(max_memory)
        _check_gpus([("max_memory names", d) for d in budgets])
    elif auto:
        budgets = default_max_memory()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    placement = plan_placement(config, head, itemsize, device_map, budgets)
    _check_gpus([(f"device_map places {module_key(n, head)} on", d) for n, d in placement.devices.items()])
    disk_names = [p for u in placement.offloaded for p in u.params]
    with open_checkpoint(folder, config, head, fmt=fmt, allow_non_finite=allow_non_finite) as ckpt:
        source = disk_weights(ckpt, disk_names, dtype, offload_folder) if disk_names else None
        model = _empty_plain(model_class, config, dtype, attn_implementation)
        model.offload = dispatch(model, placement, source)
        fill_parameters(model, ckpt, skip=set(disk_names))
    # The reader reopens its files on the next read: closing here leaves no handle idle.
    model.loading_info = ckpt.accounting
    model.hf_device_map = placement.hf_device_map(head)
    return model


def describe(model: Any) -> str:
    """One line on where a dispatched model's weights are: bytes per device, disk layers' source."""
    d: Dispatch = model.offload
    per: dict[str, int] = {}
    for u in d.placement.units:
        key = str(d.placement.devices[u.name])
        per[key] = per.get(key, 0) + u.nbytes
    parts = [f"{k}: {format_bytes(v)}" for k, v in per.items()]
    if d.source is not None:
        parts.append(f"disk layers read from {d.source.where}")
    return "; ".join(parts)


__all__ = ["OFFLOAD_FILE", "DiskWeights", "Dispatch", "StreamedModule", "check_dispatch_options", "default_max_memory",
           "describe", "disk_weights", "dispatch", "from_pretrained_dispatched"]
