"""What the host offers (CPU model and instruction-set flags) and one memory helper: plain Python,
shared by the backends' kernel choices and the benchmarks' reports."""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CPUInfo:
    """model_name: e.g. "AMD EPYC 9454P 48-Core Processor"; flags: the instruction-set flags the
    kernel reports (`avx2`, `avx512_vnni`, `amx_bf16`, ...), empty where it reports none."""

    model_name: str
    flags: frozenset[str]


@functools.lru_cache(maxsize=8)  # read once: every quantized layer asks
def cpu_info(cpuinfo: str | Path = CPUINFO) -> CPUInfo:
    """The first processor's model name and flags from a Linux `/proc/cpuinfo`-style file.

    Where the file is missing or unreadable (not Linux) or names no model, the model name is
    Python's `platform.processor()` (or "unknown CPU") and the flags are empty: callers treat a
    missing flag as a missing feature, which is the safe reading."""
    name: str | None = None
    flags: frozenset[str] = frozenset()
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if name is not None and flags:
            break
    return CPUInfo(name or platform.processor() or "unknown CPU", flags)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`). Weights allocated from the heap
    (after earlier frees raised glibc's mmap threshold) stay resident after they are freed
    otherwise, so peak RSS would be the float model's even after quantizing or packing it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
