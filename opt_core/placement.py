"""Where each part of a model lives when it does not all fit in one memory: a device map.

Framework-free planning with Accelerate's big-model semantics, from the canonical parameter table:

- The model is cut into *units*, the modules Hugging Face's `hf_device_map` names: each decoder
  layer whole (never split: a layer runs on one device), and every module outside the layers
  (`decoder.embed_tokens`, `decoder.embed_positions`, `decoder.final_layer_norm`, the
  projections, the head). A tied `lm_head` is part of the token embedding's unit: it *is* that
  tensor, so it goes where the embedding goes and costs nothing more.
- Devices are GPU indices (0, 1, ...), "cpu" and "disk". `max_memory` gives each device's budget
  in bytes or as a size string ("1GB" = 10**9 bytes, "500MiB" = 500 * 2**20, as Accelerate reads
  them); a device it leaves out is not used, except "disk", which is always the last resort.
- `device_map="auto"` fills the devices in order (GPUs by index, then the CPU) and sends the
  decoder layers that do not fit to disk. The modules outside the layers (embeddings, final
  LayerNorm, projections, head) always stay in memory: they are placed first, each on the first
  device with room. When any layer goes to disk, the *main device* (the first one, where disk
  layers run) keeps room for the largest layer, so that a layer streamed in from disk fits beside
  what is resident: `max_memory` then bounds everything held at any moment. Accelerate keeps that
  room on the first GPU and on the CPU, offloaded or not; here layers placed on the CPU run on the
  CPU (they are not streamed to a GPU) and a disk layer reaches a GPU through a small read buffer,
  so the room is kept only where disk layers run, and only when there are some.
- An explicit device map names units (or a module above them, such as `model.decoder.layers` or
  `""` for the whole model); the longest matching name decides each unit.

Names here are canonical (`decoder.layers.3`); `hf_key` gives Hugging Face's key for the model's
head (`model.decoder.layers.3` for a causal LM).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opt_core.config import OPTConfig
from opt_core.formats.files import parse_size
from opt_core.params import Head, hf_name, parameter_table

Device = int | str  # a GPU index, "cpu" or "disk"
DISK = "disk"
CPU = "cpu"
AUTO_MAPS = ("auto", "sequential")  # "auto" fills devices in order, which Accelerate calls "sequential"

_CUDA = re.compile(r"cuda(?::(\d+))?$")


class PlacementError(ValueError):
    """A device map or memory budget that cannot place the model (one line, naming what failed)."""


@dataclass(frozen=True)
class Unit:
    """One placeable module: a whole decoder layer or one module outside the layers.

    Attributes:
        name: canonical module path (`decoder.layers.3`, `decoder.embed_tokens`, `lm_head`).
        params: the canonical parameter names it holds.
        nbytes: bytes of those parameters at the load dtype (a tied parameter counts once).
        layer: the decoder layer index, or None outside the layers.
        aliases: other module paths that share this unit's storage (the tied `lm_head`).
    """

    name: str
    params: tuple[str, ...]
    nbytes: int
    layer: int | None = None
    aliases: tuple[str, ...] = ()


@dataclass
class Placement:
    """Where every unit lives.

    Attributes:
        devices: canonical unit name -> device (GPU index, "cpu" or "disk").
        main_device: where inputs enter and where disk layers run (the token embedding's device).
        units: the units, in the model's execution order.
    """

    devices: dict[str, Device]
    main_device: Device
    units: list[Unit] = field(default_factory=list)

    def device_of(self, unit: str) -> Device:
        return self.devices[unit]

    @property
    def offloaded(self) -> list[Unit]:
        """The decoder layers on disk, in order."""
        return [u for u in self.units if self.devices[u.name] == DISK]

    def hf_device_map(self, head: Head | str) -> dict[str, Device]:
        """Hugging Face's `model.hf_device_map`: module path (the model's own keys) -> device, in
        execution order, the tied `lm_head` listed with the device of the embedding it shares."""
        out: dict[str, Device] = {}
        for u in self.units:
            for name in (u.name, *u.aliases):
                out[module_key(name, head)] = self.devices[u.name]
        return out


def module_key(unit: str, head: Head | str) -> str:
    """Hugging Face's module path for canonical module path `unit` in a model of kind `head`."""
    return hf_name(unit, head)


def _module_of(param: str) -> str:
    """`decoder.layers.3.fc1.weight` -> `decoder.layers.3`; `decoder.embed_tokens.weight` -> `decoder.embed_tokens`."""
    parts = param.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return ".".join(parts[:3])
    return ".".join(parts[:-1])


def placement_units(config: OPTConfig, head: Head | str, itemsize: int) -> list[Unit]:
    """The model's units in execution order (embeddings, layers, final LayerNorm/projection, head),
    sized at `itemsize` bytes per element."""
    table = parameter_table(config, head)
    by_name = {s.name: s for s in table}
    grouped: dict[str, list[str]] = {}
    aliases: dict[str, list[str]] = {}
    for spec in table:
        module = _module_of(spec.name)
        if spec.tied_to is not None:  # shares its target's storage: same unit, no bytes
            aliases.setdefault(_module_of(spec.tied_to), []).append(module)
            continue
        grouped.setdefault(module, []).append(spec.name)

    first = ("decoder.embed_tokens", "decoder.embed_positions", "decoder.project_in")
    last = ("decoder.final_layer_norm", "decoder.project_out")

    def rank(module: str) -> tuple[int, int]:
        # Execution order (the table's is Hugging Face's registration order): embeddings and
        # project_in, the layers, final LayerNorm and project_out, then the head.
        if module.startswith("decoder.layers."):
            return (1, int(module.split(".")[2]))
        if module in first:
            return (0, first.index(module))
        return (2, last.index(module)) if module in last else (3, 0)

    units = []
    for module in sorted(grouped, key=rank):
        params = tuple(grouped[module])
        layer = by_name[params[0]].layer
        nbytes = sum(by_name[p].numel for p in params) * itemsize
        units.append(Unit(module, params, nbytes, layer, tuple(aliases.get(module, ()))))
    return units


# ---------------------------------------------------------------- devices and budgets
def normalize_device(value: Any, what: str) -> Device:
    """A GPU index, "cpu" or "disk" from what users write: 0, "cuda", "cuda:1", "cpu", "disk" (or
    an object whose str() is one of those, such as a torch.device).

    Raises:
        PlacementError: naming `what` (the key it was given for) and the value.
    """
    if isinstance(value, bool):
        raise PlacementError(f"{what}: device {value!r} is not a device")
    if isinstance(value, int):
        if value < 0:
            raise PlacementError(f"{what}: GPU index {value} is negative")
        return value
    text = str(value)
    if text in (CPU, DISK):
        return text
    m = _CUDA.match(text)
    if m:
        return int(m.group(1) or 0)
    raise PlacementError(
        f"{what}: unknown device {value!r}; expected a GPU index (0, 1, ...), 'cuda', 'cuda:N', 'cpu' or 'disk'"
    )


def device_order(device: Device) -> tuple[int, int]:
    """GPUs by index first, then the CPU, then disk: the order "auto" fills them in."""
    if isinstance(device, int):
        return (0, device)
    return (1, 0) if device == CPU else (2, 0)


def parse_max_memory(max_memory: Mapping[Any, Any]) -> dict[Device, int]:
    """`{0: "10GiB", "cpu": "1GB"}` -> `{0: 10737418240, "cpu": 1000000000}`, ordered GPUs then CPU.

    Sizes are bytes (int) or strings with a unit: "GB"/"MB"/"KB" are powers of 10, "GiB"/"MiB"/"KiB"
    powers of 2 (Accelerate's reading). Disk is unbounded and cannot be given a budget.

    Raises:
        PlacementError: an unknown device, a "disk" entry, a size that does not parse or is negative.
    """
    if not isinstance(max_memory, Mapping):
        raise PlacementError(f"max_memory must be a dict of device -> size, got {type(max_memory).__name__}")
    out: dict[Device, int] = {}
    for key, size in max_memory.items():
        device = normalize_device(key, f"max_memory key {key!r}")
        if device == DISK:
            raise PlacementError("max_memory['disk']: disk space is not budgeted; leave 'disk' out of max_memory")
        if device in out:
            raise PlacementError(f"max_memory names device {device!r} twice")
        try:
            nbytes = parse_size(size) if not isinstance(size, bool) else -1
        except ValueError:
            nbytes = -1
        if nbytes < 0:
            raise PlacementError(
                f"max_memory[{key!r}] = {size!r} is not a size; "
                "use bytes (an int) or a string such as '1GB' or '500MiB'"
            )
        out[device] = nbytes
    return dict(sorted(out.items(), key=lambda kv: device_order(kv[0])))


def format_bytes(n: int) -> str:
    """`1234567` -> `'1.23 MB'` (decimal units, as max_memory's "MB")."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------- planning
def plan_auto(units: Sequence[Unit], budgets: Mapping[Device, int]) -> Placement:
    """Accelerate's "auto" placement: devices filled in order, overflowing layers on disk.

    Args:
        units: `placement_units(...)`.
        budgets: device -> bytes (`parse_max_memory`), without "disk".
    Returns:
        The placement; `main_device` is the first device of `budgets`.
    Raises:
        PlacementError: no device given, or a module that must stay in memory (embeddings, final
            LayerNorm, projections, head) fits on none of them.
    """
    devices = sorted(budgets, key=device_order)
    if not devices:
        raise PlacementError("max_memory names no device; give at least {'cpu': SIZE}")
    main = devices[0]
    largest_layer = max((u.nbytes for u in units if u.layer is not None), default=0)

    def fill(reserve: int) -> dict[str, Device]:
        left = dict(budgets)
        left[main] -= reserve
        placed: dict[str, Device] = {}
        for u in units:
            if u.layer is not None:
                continue
            where = next((d for d in devices if left[d] >= u.nbytes), None)
            if where is None:
                room = ", ".join(f"{d!r}: {format_bytes(max(left[d], 0))} left" for d in devices)
                kept = (f" after keeping {format_bytes(reserve)} on {main!r} to stream one layer from disk"
                        if reserve else "")
                raise PlacementError(
                    f"max_memory {dict(budgets)!r} cannot hold {u.name} ({format_bytes(u.nbytes)}){kept} ({room}); "
                    "the embeddings, final LayerNorm, projections and head stay in memory (only decoder layers "
                    "are offloaded to disk): raise max_memory"
                )
            left[where] -= u.nbytes
            placed[u.name] = where
        i = 0
        for u in units:  # the layers, in order: once a device is full, later layers go further on
            if u.layer is None:
                continue
            while i < len(devices) and left[devices[i]] < u.nbytes:
                i += 1
            where = devices[i] if i < len(devices) else DISK
            if where != DISK:
                left[where] -= u.nbytes
            placed[u.name] = where
        return placed

    placed = fill(0)
    if DISK in placed.values():
        placed = fill(largest_layer)  # a disk layer needs room on the main device while it runs
    return Placement({u.name: placed[u.name] for u in units}, main, list(units))


def plan_from_dict(units: Sequence[Unit], device_map: Mapping[str, Any], head: Head | str) -> Placement:
    """An explicit device map (Hugging Face module paths -> devices) checked and resolved per unit.

    A key may name a unit (`model.decoder.layers.3`), a module above units (`model.decoder.layers`,
    `model.decoder`, `""` for everything): the longest key that is the unit's path or one of its
    parents decides.

    Raises:
        PlacementError: an unknown device; a key that names no module of the model or a part of a
            decoder layer (layers are placed whole); a unit no key covers; a module outside the
            layers on "disk"; a tied lm_head placed apart from the embedding it shares.
    """
    if not isinstance(device_map, Mapping):
        raise PlacementError(f"device_map must be 'auto', a device or a dict, got {type(device_map).__name__}")
    keyed: dict[str, Device] = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise PlacementError(f"device_map key {key!r} is not a module path (a string)")
        keyed[key] = normalize_device(value, f"device_map[{key!r}]")
    paths = {module_key(u.name, head): u for u in units}
    aliases = {module_key(a, head): u for u in units for a in u.aliases}

    def covers(key: str, path: str) -> bool:
        return key == "" or path == key or path.startswith(key + ".")

    for key in keyed:
        if not any(covers(key, p) for p in (*paths, *aliases)):
            inside = next((p for p in paths if key.startswith(p + ".")), None)
            if inside is not None:
                raise PlacementError(
                    f"device_map key {key!r} names a part of {inside}; a decoder layer is placed whole: use {inside!r}"
                )
            raise PlacementError(
                f"device_map key {key!r} names no module of this model; modules are for example "
                f"{', '.join(list(paths)[:3])}, ..."
            )
    devices: dict[str, Device] = {}
    uncovered = []
    for path, u in paths.items():
        matches = [k for k in keyed if covers(k, path)]
        if not matches:
            uncovered.append(path)
            continue
        devices[u.name] = keyed[max(matches, key=len)]
    if uncovered:
        raise PlacementError(f"device_map places no device for {', '.join(uncovered)}")
    on_disk = [module_key(u.name, head) for u in units if u.layer is None and devices[u.name] == DISK]
    if on_disk:
        raise PlacementError(
            f"device_map puts {', '.join(on_disk)} on 'disk'; only decoder layers can be offloaded to disk"
        )
    for alias, u in aliases.items():
        matches = [k for k in keyed if covers(k, alias)]
        if matches and keyed[max(matches, key=len)] != devices[u.name]:
            raise PlacementError(
                f"device_map puts {alias} on {keyed[max(matches, key=len)]!r} but it is tied to "
                f"{module_key(u.name, head)} on {devices[u.name]!r}; they are one tensor and must share a device"
            )
    main = devices[units[0].name]
    return Placement(devices, main, list(units))


def plan_placement(
    config: OPTConfig,
    head: Head | str,
    itemsize: int,
    device_map: Any,
    budgets: Mapping[Device, int] | None = None,
) -> Placement:
    """The placement for `from_pretrained(device_map=..., max_memory=...)`.

    Args:
        device_map: "auto"/"sequential", one device for the whole model (0, "cuda:1", "cpu"), or a
            dict of module path -> device.
        budgets: parsed max_memory (`parse_max_memory`), needed for "auto".
    Raises:
        PlacementError: see `plan_auto` and `plan_from_dict`.
    """
    units = placement_units(config, head, itemsize)
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        if budgets is None:
            raise PlacementError("device_map='auto' needs max_memory (the backend fills in what is free)")
        return plan_auto(units, budgets)
    if isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0"):
        raise PlacementError(
            f"device_map={device_map!r} is not supported; 'auto' fills devices in order, or pass a dict"
        )
    if not isinstance(device_map, Mapping):
        device_map = {"": normalize_device(device_map, "device_map")}
    return plan_from_dict(units, device_map, head)


__all__ = [
    "AUTO_MAPS", "CPU", "DISK", "Device", "Placement", "PlacementError", "Unit", "device_order", "format_bytes",
    "module_key", "normalize_device", "parse_max_memory", "plan_auto", "plan_from_dict", "plan_placement",
    "placement_units",
]
