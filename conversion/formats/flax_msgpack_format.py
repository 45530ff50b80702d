"""Hugging Face `flax_model.msgpack`, through `opt_core.formats.flax_msgpack` (the one place Flax
paths live).

Reading parses the file through a read-only memory map and copies one tensor out per call; the map
is closed after each call, so its pages do not accumulate in the resident set. Writing packs the
tree incrementally, pulling one tensor at a time, and writes each tensor's bytes straight from its
buffer after a hand-made ext header (`write_flax_msgpack_streaming`), byte-identical to
`write_flax_msgpack`, whose msgpack calls would copy every tensor three times.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conversion.formats.base import Reader, Scratch, Writer, fast_transpose
from opt_core.checkpoint import FLAX_MSGPACK, CheckpointError
from opt_core.config import OPTConfig
from opt_core.formats import flax_msgpack as fm
from opt_core.formats.flax_msgpack import flax_msgpack_shapes, read_flax_msgpack
from opt_core.params import Head, ParamSpec, Role, parameter_table


class FlaxMsgpackReader(Reader):
    """A folder holding `flax_model.msgpack`, or the file itself. `config` (needed to recognise the
    identity biases/scales Hugging Face Flax stores for no-bias / no-affine configs) is set by the
    converter before `shapes()` is called."""

    fmt = "flax-msgpack"

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None):
        path = Path(path)
        file = path if path.is_file() else path / FLAX_MSGPACK
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {FLAX_MSGPACK}")
        super().__init__(path, [file])
        self._file = file
        self.layout_config = config
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self._fh = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = flax_msgpack_shapes(self._file, self.layout_config)
        return dict(self._shapes)

    def dtype(self, key: str) -> np.dtype:
        if not self._dtypes:
            # msgpack headers only (no tensor is copied); the path walk is flax_msgpack's own
            from opt_core.formats.flax_msgpack import _canonical_leaves, _MappedFile

            with _MappedFile(self._file) as leaves:
                table = _canonical_leaves(leaves, str(self._file))
                self._dtypes = {name: np.dtype(ref.dtype) for name, (ref, _, _) in table.items()}
                del table
        return self._dtypes[key]

    def _index(self) -> None:
        """Parse the tree once and remember where each tensor's bytes are in the file, then unmap it.

        `read_flax_msgpack` re-maps and re-parses the whole file per call (quadratic over a model
        read one tensor at a time) and copies out of the map, whose touched pages then count as
        resident. Here tensors are read with plain file reads at the offsets the parse found; the
        identity extras it verifies are verified once, through it."""
        for _ in read_flax_msgpack(self._file, set(), self.layout_config):  # verifies extras, yields nothing
            pass
        self._where: dict[str, tuple[tuple[int, ...], np.dtype, bool, list[tuple[int, int]]]] = {}
        mapped = fm._MappedFile(self._file)
        with mapped as leaves:
            base = _address(mapped._view)
            table = fm._canonical_leaves(leaves, str(self._file))
            for name, (ref, transposed, _) in table.items():
                pieces = ref.chunks if ref.chunks is not None else [ref]
                spans = [(_address(p.data) - base, p.data.nbytes) for p in pieces]  # type: ignore[union-attr]
                self._where[name] = (tuple(ref.shape), np.dtype(ref.dtype), transposed, spans)
            del table, leaves, pieces  # release our views into the map before it closes
        self._raw = Scratch()
        self._fh = open(self._file, "rb")  # noqa: SIM115 (closed in close())

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        if self._fh is None:
            self._index()
        if key not in self._where or key not in self.shapes():
            raise KeyError(f"{self._file} holds no {key}")
        shape, dtype, transposed, spans = self._where[key]
        target = shape[::-1] if transposed else shape
        if out is None or out.shape != target or out.dtype != dtype or not out.flags.c_contiguous:
            out = np.empty(target, dtype=dtype)
        raw = self._raw.array(shape, dtype) if transposed else out
        flat = raw.reshape(-1).view(np.uint8)
        pos = 0
        for offset, n in spans:  # one span, or Flax's chunks in order
            if n == 0:
                continue
            self._fh.seek(offset)
            got = self._fh.readinto(memoryview(flat[pos : pos + n]))
            if got != n:
                raise CheckpointError(f"{self._file} is truncated: {key} needs {n} bytes at {offset}, read {got}")
            pos += n
        if pos != flat.nbytes:
            raise CheckpointError(f"{self._file}: {key} holds {pos} bytes, its shape needs {flat.nbytes}")
        if transposed:
            fast_transpose(raw, out=out)  # Flax kernel [in, out] -> canonical [out, in]
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _address(view: memoryview) -> int:
    """The memory address a buffer starts at (no copy, no page touched)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def _ext_header(length: int, code: int) -> bytes:
    """msgpack's header for an ext object of `length` payload bytes (the encoding msgpack-python picks)."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if length in fixed:
        return struct.pack(">Bb", fixed[length], code)
    if length <= 0xFF:
        return struct.pack(">BBb", 0xC7, length, code)
    if length <= 0xFFFF:
        return struct.pack(">BHb", 0xC8, length, code)
    return struct.pack(">BIb", 0xC9, length, code)


def _bin_header(length: int) -> bytes:
    if length <= 0xFF:
        return struct.pack(">BB", 0xC4, length)
    if length <= 0xFFFF:
        return struct.pack(">BH", 0xC5, length)
    return struct.pack(">BI", 0xC6, length)


def _write_array(out, packer, arr: np.ndarray) -> None:
    """One leaf as Flax's ext record `(shape, dtype name, raw bytes)`, the bytes written straight
    from the array's buffer. Byte-identical to `flax_msgpack._record` packed as an ExtType."""
    arr = np.ascontiguousarray(arr)
    prefix = b"\x93" + packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name) + _bin_header(arr.nbytes)
    out.write(_ext_header(len(prefix) + arr.nbytes, fm._EXT_NDARRAY) + prefix)
    out.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _write_tree(out, packer, tree: dict[str, Any]) -> None:
    """`flax_msgpack._pack_tree` without its three copies of every tensor (tobytes, packb, pack)."""
    out.write(packer.pack_map_header(len(tree)))
    for key, value in sorted(tree.items()):  # sorted, as Flax (and flax_msgpack) write them
        out.write(packer.pack(key))
        if isinstance(value, dict):
            _write_tree(out, packer, value)
            continue
        arr = value() if callable(value) else value
        if arr.nbytes > fm.MAX_CHUNK_BYTES:  # Flax's chunked form, as flax_msgpack writes it
            step = max(1, fm.MAX_CHUNK_BYTES // arr.dtype.itemsize)
            flat = arr.reshape(-1)
            chunks = {str(i): flat[s : s + step] for i, s in enumerate(range(0, flat.size, step))}
            out.write(packer.pack_map_header(3))
            out.write(packer.pack(fm._CHUNKED))
            out.write(packer.pack(True))
            out.write(packer.pack("shape"))
            out.write(packer.pack({str(i): int(d) for i, d in enumerate(arr.shape)}))
            out.write(packer.pack("chunks"))
            _write_tree(out, packer, chunks)
            continue
        _write_array(out, packer, arr)
        del arr


def write_flax_msgpack_streaming(path: Path, tensors: dict[str, Callable[[], np.ndarray]], config: OPTConfig,
                                 head: Head) -> Path:
    """`opt_core.formats.flax_msgpack.write_flax_msgpack` for lazily loaded tensors, with no extra
    copy of any tensor: the same tree (its path mapping, identity extras and order) and the same
    bytes (the tests compare them), but every ext record is written as a header followed by the
    array's own buffer. Peak memory: the tensor being written (plus its [in, out] copy for kernels).
    """
    table = parameter_table(config, head)
    flat: dict[tuple[str, ...], Any] = {}
    for spec in table:
        if spec.tied_to is not None:
            continue  # HF Flax reads the tied lm_head from the embedding

        def load(spec: ParamSpec = spec) -> np.ndarray:
            arr = tensors[spec.name]()
            if tuple(arr.shape) != spec.shape:
                raise CheckpointError(f"cannot write {path}: {spec.name} has shape {list(arr.shape)}, "
                                      f"the config implies {list(spec.shape)}")
            return np.ascontiguousarray(arr.T) if spec.role is Role.LINEAR_WEIGHT else arr

        flat[fm.flax_path(spec, head)] = load
    dtype = fm._first_float_dtype(tensors)
    for name, (shape, value) in fm.identity_extras(config).items():
        extra = ParamSpec(name, shape, Role.NORM_WEIGHT if value == 1.0 else Role.LINEAR_BIAS)
        flat[fm.flax_path(extra, head)] = np.full(shape, value, dtype=dtype)
    import msgpack

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            _write_tree(out, msgpack.Packer(use_bin_type=True), fm._nest(flat))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class FlaxMsgpackWriter(Writer):
    """Writes `flax_model.msgpack` in Hugging Face's tree layout, one tensor at a time, with no copy
    of a tensor beyond its [in, out] layout (see `write_flax_msgpack_streaming`)."""

    fmt = "flax-msgpack"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def lazy(name: str) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                arr = fetch(name)
                self._check(name, arr)
                return self._kernel_ready(name, arr)

            return load

        write_flax_msgpack_streaming(self.folder / FLAX_MSGPACK, {p.spec.name: lazy(p.spec.name) for p in self.plan},
                                     self.config, self.head)

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / FLAX_MSGPACK]
