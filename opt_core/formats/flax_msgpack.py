"""Hugging Face Flax checkpoints (`flax_model.msgpack`): the one place Flax parameter paths appear.

Framework-free (msgpack + NumPy; `ml_dtypes` only for bfloat16 files). The file is what
`flax.serialization.to_bytes(params)` writes: a msgpack map of nested maps whose leaves are msgpack
ext objects of type 1, each holding the msgpack triple (shape, dtype name, raw C-order bytes).
Leaves larger than 2**30 bytes are split into a `{"__msgpack_chunked_array__": True, "shape": ...,
"chunks": ...}` map, as Flax does.

Path mapping (layer 0 shown), canonical name <-> Flax path:

    decoder.embed_tokens.weight                 <-> model/decoder/embed_tokens/embedding
    decoder.embed_positions.weight              <-> model/decoder/embed_positions/embedding
    decoder.layers.0.self_attn.q_proj.weight    <-> model/decoder/layers/0/self_attn/q_proj/kernel  ([in, out])
    decoder.layers.0.self_attn.q_proj.bias      <-> model/decoder/layers/0/self_attn/q_proj/bias
    decoder.layers.0.final_layer_norm.weight    <-> model/decoder/layers/0/final_layer_norm/scale
    decoder.project_in.weight                   <-> model/decoder/project_in/kernel
    lm_head.weight (untied only)                <-> lm_head/kernel

`FlaxOPTModel` (head "base") stores the decoder without the `model/` prefix. Hugging Face has no
Flax classes for the classification and QA heads; this module writes them as `score/kernel` and
`qa_outputs/{kernel,bias}` beside `model/`, mirroring the torch names.

Hugging Face's Flax OPT ignores `enable_bias` and `layer_norm_elementwise_affine`: its Dense layers
always have a bias and its LayerNorms always have scale and bias. To stay loadable there, the writer
stores zero biases and unit scales for configs without them, and the reader (given the config)
accepts those extra tensors only when they hold exactly those identity values, then drops them.

`FlaxMsgpackReader` parses the file once through `mmap` and then reads one tensor at a time by file
offset, so reading never needs the whole checkpoint in memory; `write_flax_msgpack` streams the tree
and writes each tensor straight from its buffer.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.formats._transpose import Scratch, fast_transpose, kernel_layout
from opt_core.formats.base import (
    CheckpointError,
    Reader,
    Writer,
    final_permissions,
    open_file,
    out_array,
)
from opt_core.formats.files import FLAX_MSGPACK
from opt_core.params import Head, ParamSpec, Role, parameter_table
from opt_core.safe_files import bounded_repr

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
MAX_CHUNK_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE
# Bounds on what a parameter tree may look like: a Hugging Face OPT tree is 6 maps deep, its arrays
# have rank <= 2, its keys are short. Anything far beyond is refused before it costs recursion or memory.
MAX_DEPTH = 32
MAX_RANK = 8
MAX_KEY_BYTES = 1024
# The dtype names Flax writes that a checkpoint may hold (non-float ones are refused later by name).
DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")


# ---------------------------------------------------------------- path mapping
def _decoder_root(head: Head | str) -> tuple[str, ...]:
    return () if Head(head) is Head.BASE else ("model",)


def flax_path(spec: ParamSpec, head: Head | str) -> tuple[str, ...]:
    """The Flax parameter path of canonical parameter `spec` in a model of kind `head`."""
    parts = spec.name.split(".")
    leaf = parts[-1]
    if spec.role in (Role.TOKEN_EMBEDDING, Role.POSITION_EMBEDDING):
        leaf = "embedding"
    elif spec.role is Role.LINEAR_WEIGHT:
        leaf = "kernel"
    elif spec.role is Role.NORM_WEIGHT:
        leaf = "scale"
    root = _decoder_root(head) if parts[0] == "decoder" else ()
    return (*root, *parts[:-1], leaf)


def canonical_from_flax(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax path -> (canonical name, whether the stored tensor is a transposed [in, out] kernel).

    Works without a config: the leaf name decides (`kernel` -> `weight`, transposed; `scale` and
    `embedding` -> `weight`; `bias` stays). An unknown leaf name keeps its spelling, so strict key
    accounting reports it as unexpected.
    """
    parts = list(path)
    if len(parts) >= 2 and parts[0] == "model" and parts[1] == "decoder":
        parts = parts[1:]
    leaf = parts[-1]
    transposed = leaf == "kernel"
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join([*parts[:-1], leaf]), transposed


def identity_extras(config: OPTConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Tensors Hugging Face Flax always stores but `config` does not have: canonical name ->
    (shape, the constant value that makes them a no-op: 0 for biases, 1 for LayerNorm scales)."""
    full = config.replace(enable_bias=True, layer_norm_elementwise_affine=True)
    have = {s.name for s in parameter_table(config, Head.BASE)}
    out: dict[str, tuple[tuple[int, ...], float]] = {}
    for spec in parameter_table(full, Head.BASE):
        if spec.name not in have:
            out[spec.name] = (spec.shape, 1.0 if spec.role is Role.NORM_WEIGHT else 0.0)
    return out


# ---------------------------------------------------------------- msgpack parsing (read side)
@dataclass
class _Blob:
    """A msgpack `bin` payload: where its bytes are in the file, and a view of them while mapped."""

    offset: int
    view: memoryview


@dataclass
class _ArrayRef:
    """Where a tensor's bytes are in the file: one span, or Flax's chunks in order."""

    shape: tuple[int, ...]
    dtype: np.dtype
    spans: list[tuple[int, int]]  # (file offset, byte count)


def _dtype(name: object, source: str, offset: int) -> np.dtype:
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"{source}: the array record at offset {offset} has dtype {bounded_repr(name, 100)}, "
                              f"expected one of {', '.join(DTYPE_NAMES)}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(str(name))


class _Parser:
    """A minimal msgpack decoder over a buffer: maps, arrays, scalars, strings; `bin` payloads are
    returned as `_Blob`s (file offset + zero-copy view) and ext ndarrays as `_ArrayRef`s."""

    def __init__(self, buf: memoryview, source: str, base: int = 0, depth: int = 0):
        self.buf, self.pos, self.source, self.base, self.depth = buf, 0, source, base, depth

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.source} is truncated (needed {n} bytes at offset {self.base + self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def _int(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big", signed=True)

    def _blob(self, n: int) -> _Blob:
        offset = self.base + self.pos
        return _Blob(offset, self._take(n))

    def _str(self, n: int) -> str:
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.source}: invalid UTF-8 string at offset {self.base + self.pos - n}") from None

    def _array(self, n: int) -> list:
        self._check_count(n)
        self.depth += 1
        try:
            return [self.value() for _ in range(n)]
        finally:
            self.depth -= 1

    def _check_count(self, n: int) -> None:
        if self.depth >= MAX_DEPTH:
            raise CheckpointError(
                f"{self.source}: msgpack nesting deeper than {MAX_DEPTH} at offset {self.base + self.pos}"
            )
        if n > len(self.buf) - self.pos:  # every element takes at least one byte
            raise CheckpointError(
                f"{self.source}: a container at offset {self.base + self.pos} claims {n} elements, more than "
                "the bytes left"
            )

    def value(self) -> Any:
        b = self._uint(1)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F)
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):
            return self._blob(self._uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[b]))
        if b in (0xC7, 0xC8, 0xC9):
            n = self._uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
            return self._ext(self._int(1), self._blob(n))
        if b == 0xCA:
            return float(np.frombuffer(self._take(4), ">f4")[0])
        if b == 0xCB:
            return float(np.frombuffer(self._take(8), ">f8")[0])
        if 0xCC <= b <= 0xCF:
            return self._uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            return self._int(1 << (b - 0xD0))
        if 0xD4 <= b <= 0xD8:
            code = self._int(1)
            return self._ext(code, self._blob(1 << (b - 0xD4)))
        if 0xD9 <= b <= 0xDB:
            return self._str(self._uint(1 << (b - 0xD9)))
        if b in (0xDC, 0xDD):
            return self._array(self._uint(2 if b == 0xDC else 4))
        if b in (0xDE, 0xDF):
            return self._map(self._uint(2 if b == 0xDE else 4))
        raise CheckpointError(f"{self.source}: unsupported msgpack byte 0x{b:02x} at offset {self.base + self.pos - 1}")

    def _map(self, n: int) -> dict:
        self._check_count(n)
        self.depth += 1
        out = {}
        try:
            for _ in range(n):
                at = self.base + self.pos
                key = self.value()
                if not isinstance(key, (str, int)) or len(str(key)) > MAX_KEY_BYTES:
                    raise CheckpointError(f"{self.source}: a map key at offset {at} is not a short string")
                if str(key) in out:
                    raise CheckpointError(
                        f"{self.source}: the map key {bounded_repr(str(key), 120)} appears twice (offset {at})"
                    )
                out[str(key)] = self.value()
        finally:
            self.depth -= 1
        return out

    def _ext(self, code: int, payload: _Blob) -> Any:
        if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
            raise CheckpointError(f"{self.source}: unsupported msgpack ext type {code} at offset {payload.offset}")
        inner = _Parser(payload.view, self.source, payload.offset, self.depth + 1).value()
        if not (isinstance(inner, list) and len(inner) == 3 and isinstance(inner[2], _Blob)
                and isinstance(inner[0], list) and all(isinstance(d, int) and d >= 0 for d in inner[0])
                and len(inner[0]) <= MAX_RANK):
            raise CheckpointError(f"{self.source}: malformed array record at offset {payload.offset}")
        shape, dtype_name, data = inner
        if isinstance(dtype_name, _Blob):
            try:
                dtype_name = str(dtype_name.view, "utf-8")
            except UnicodeDecodeError:
                dtype_name = repr(bytes(dtype_name.view[:50]))
        dtype = _dtype(dtype_name, self.source, payload.offset)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != data.view.nbytes:
            raise CheckpointError(
                f"{self.source}: the array record at offset {payload.offset} is {list(shape)} {dtype} but holds "
                f"{data.view.nbytes} bytes"
            )
        return _ArrayRef(tuple(shape), dtype, [(data.offset, data.view.nbytes)])


def _unchunk(tree: Any, source: str, prefix: tuple[str, ...] = ()) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED) is True:
            where = "/".join(prefix)
            try:
                shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
                chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
                if (not chunks or not all(isinstance(c, _ArrayRef) and c.dtype == chunks[0].dtype for c in chunks)
                        or len(shape) > MAX_RANK or any(d < 0 for d in shape)
                        or set(tree) != {_CHUNKED, "shape", "chunks"}):
                    raise ValueError
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CheckpointError(f"{source}: {where} is a malformed chunked array") from None
            ref = _ArrayRef(shape, chunks[0].dtype, [span for c in chunks for span in c.spans])
            if sum(n for _, n in ref.spans) != int(np.prod(shape, dtype=np.int64)) * ref.dtype.itemsize:
                raise CheckpointError(f"{source}: {where}: its chunks do not add up to shape {list(shape)}")
            return ref
        return {k: _unchunk(v, source, (*prefix, k)) for k, v in tree.items()}
    return tree


def _leaves(tree: Any, prefix: tuple[str, ...], source: str) -> Iterator[tuple[tuple[str, ...], _ArrayRef]]:
    if isinstance(tree, _ArrayRef):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key), source)
    else:
        raise CheckpointError(f"{source}: {'/'.join(prefix)} holds a {type(tree).__name__}, not an array")


def _parse(path: Path) -> list[tuple[tuple[str, ...], _ArrayRef]]:
    """(Flax path, where its bytes are) for every leaf, from one parse of the file mapped
    read-only; no tensor byte is touched and the map is closed before returning."""
    if not path.exists():
        raise FileNotFoundError(f"no Flax checkpoint at {path}")
    file = open_file(path)
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise CheckpointError(f"{path} is empty")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            parser = _Parser(view, str(path))
            tree = _unchunk(parser.value(), str(path))
            if parser.pos != len(view):
                raise CheckpointError(f"{path} has {len(view) - parser.pos} bytes after its parameter tree")
            if not isinstance(tree, dict):
                raise CheckpointError(f"{path} does not hold a parameter tree")
            if "params" in tree and isinstance(tree["params"], dict) and len(tree) == 1:
                tree = tree["params"]  # a file written from {"params": ...} variables
            return list(_leaves(tree, (), str(path)))  # offsets only: no view into the map
        finally:
            tree = None
            try:
                view.release()
                mapped.close()
            except BufferError:  # an error's traceback still holds a view; closed when collected
                pass


class FlaxMsgpackReader(Reader):
    """A `flax_model.msgpack` parsed once, read one tensor at a time in canonical (torch) layout.

    The constructor parses the msgpack structure through a read-only memory map (no tensor byte is
    touched) and remembers where each tensor's bytes are; `read` then costs plain file reads at
    those offsets (so mapped pages never pile up in the resident set), plus a transpose for
    [in, out] kernels. Use as a context manager or call `close()`.

    Args:
        path: the `.msgpack` file.
        config: when given, the identity tensors Hugging Face Flax stores for configs without
            biases or LayerNorm affine parameters are hidden from `shapes`/`read`;
            `check_identity_extras` verifies their values.
    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: malformed or truncated file, or two Flax paths mapping to one name.
    """

    fmt = "flax-msgpack"

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None, *,
                 files: list[Path] | None = None, weight_map: object = None):
        path = Path(path)
        file = files[0] if files else path / FLAX_MSGPACK if path.is_dir() else path
        super().__init__(path, [file])
        self.path = file
        self.layout_config = config
        self._checked = False
        self._file: io.BufferedReader | None = None
        self._extras = identity_extras(config) if config is not None else {}
        # canonical name -> (where its bytes are, stored as an [in, out] kernel, Flax path)
        self._table: dict[str, tuple[_ArrayRef, bool, tuple[str, ...]]] = {}
        for fpath, ref in _parse(self.path):
            name, transposed = canonical_from_flax(fpath)
            if transposed and len(ref.shape) != 2:
                raise CheckpointError(f"{self.path}: {'/'.join(fpath)} is a kernel of shape {list(ref.shape)}, not 2-D")
            if name in self._table:
                raise CheckpointError(
                    f"{self.path}: {'/'.join(self._table[name][2])} and {'/'.join(fpath)} both map to {name}"
                )
            self._table[name] = (ref, transposed, fpath)
        self._file = open_file(self.path)
        self._scratch = Scratch()

    def close(self) -> None:
        """Close the file; safe to call twice."""
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
            self._file = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> canonical (torch-layout) shape, in file order (extras left out when
        the reader has a config)."""
        return {
            name: (ref.shape[::-1] if transposed else ref.shape)
            for name, (ref, transposed, _) in self._table.items()
            if name not in self._extras
        }

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of `name`."""
        return self._entry(name)[0].dtype

    def _entry(self, name: str) -> tuple[_ArrayRef, bool, tuple[str, ...]]:
        if name not in self._table or name in self._extras:
            raise KeyError(f"{self.path} holds no {name}")
        return self._table[name]

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `name` in canonical layout and its stored dtype.

        `out` is filled and returned when it is C-contiguous with the tensor's canonical shape and
        dtype; otherwise a new array is returned.
        Raises:
            KeyError: an unknown name. CheckpointError: the file is shorter than its header says.
        """
        if not self._checked:
            self._checked = True
            self.check_identity_extras()
        return self._read(name, *self._entry(name)[:2], out)

    def _read(self, name: str, ref: _ArrayRef, transposed: bool, out: np.ndarray | None) -> np.ndarray:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        out = out_array(out, ref.shape[::-1] if transposed else ref.shape, ref.dtype)
        raw = self._scratch.array(ref.shape, ref.dtype) if transposed else out
        flat = raw.reshape(-1).view(np.uint8)
        total = sum(n for _, n in ref.spans)
        if total != flat.nbytes:
            raise CheckpointError(
                f"{self.path}: {name} holds {total} bytes, its shape {list(ref.shape)} needs {flat.nbytes}"
            )
        pos = 0
        for offset, n in ref.spans:  # one span, or Flax's chunks in order
            if n:
                self._file.seek(offset)
                got = self._file.readinto(flat[pos : pos + n].data)
                if got != n:
                    raise CheckpointError(f"{self.path} is truncated: {name} needs {n} bytes at {offset}, read {got}")
            pos += n
        if transposed:
            fast_transpose(raw, out=out)  # Flax kernel [in, out] -> canonical [out, in]
        return out

    def check_identity_extras(self) -> None:
        """Verify that every identity extra (see `identity_extras`) holds exactly 0 (biases) or 1
        (LayerNorm scales). No-op without a config.

        Raises:
            CheckpointError: an extra of the wrong shape or with other values.
        """
        for name, (shape, value) in self._extras.items():
            if name not in self._table:
                continue  # absent extras are not ours to require (key accounting reports them)
            ref, transposed, fpath = self._table[name]
            arr = self._read(name, ref, transposed, None)
            if arr.shape != shape or not np.all(arr == value):
                raise CheckpointError(
                    f"{self.path}: {'/'.join(fpath)} must be all {value:g} (the config has "
                    f"enable_bias={self.layout_config.enable_bias}, layer_norm_elementwise_affine="  # type: ignore[union-attr]
                    f"{self.layout_config.layer_norm_elementwise_affine}), but it holds other values"  # type: ignore[union-attr]
                )


# ---------------------------------------------------------------- public read API
def flax_msgpack_shapes(
    path: str | os.PathLike[str], config: OPTConfig | None = None
) -> dict[str, tuple[int, ...]]:
    """Canonical name -> canonical (torch-layout) shape of every tensor in a Flax msgpack file
    (`FlaxMsgpackReader.shapes`).

    With `config`, the identity tensors Hugging Face Flax adds for configs without biases or
    LayerNorm affine parameters are left out (their values are checked by `read_flax_msgpack`).
    Feed the result to `opt_core.checkpoint.account_keys` for strict accounting.
    """
    with FlaxMsgpackReader(path, config) as reader:
        return reader.shapes()


def read_flax_msgpack(
    path: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    config: OPTConfig | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, NumPy array in canonical torch layout), one tensor at a time, in
    file order (a `FlaxMsgpackReader` parsed once).

    Args:
        path: the `flax_model.msgpack` file.
        names: only these canonical names (default: all).
        config: when given, identity extras (see `identity_extras`) are verified and skipped.
    Raises:
        CheckpointError: malformed file, or an identity extra that is not 0 / 1.
    """
    wanted = set(names) if names is not None else None
    with FlaxMsgpackReader(path, config) as reader:
        reader.check_identity_extras()
        for name in reader.shapes():
            if wanted is None or name in wanted:
                yield name, reader.read(name)


# ---------------------------------------------------------------- write side
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
    """msgpack's header for a `bin` of `length` bytes."""
    if length <= 0xFF:
        return struct.pack(">BB", 0xC4, length)
    if length <= 0xFFFF:
        return struct.pack(">BH", 0xC5, length)
    return struct.pack(">BI", 0xC6, length)


def _write_array(out: Any, packer: Any, arr: np.ndarray) -> None:
    """One leaf as Flax's ext record (shape, dtype name, raw C-order bytes). The header is built by
    hand and the bytes are written straight from the array's buffer: the same bytes as
    `msgpack.ExtType(1, packb((shape, dtype, arr.tobytes())))`, without its three copies."""
    arr = np.ascontiguousarray(arr)
    prefix = b"\x93" + packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name) + _bin_header(arr.nbytes)
    out.write(_ext_header(len(prefix) + arr.nbytes, _EXT_NDARRAY) + prefix)
    out.write(arr.reshape(-1).view(np.uint8).data)


def _write_tree(out: Any, packer: Any, tree: dict[str, Any]) -> None:
    """A nested map, keys sorted as Flax writes them; callable leaves are loaded one at a time."""
    out.write(packer.pack_map_header(len(tree)))
    for key, value in sorted(tree.items()):
        out.write(packer.pack(key))
        if isinstance(value, dict):
            _write_tree(out, packer, value)
            continue
        arr = value() if callable(value) else value
        if arr.nbytes > MAX_CHUNK_BYTES:  # Flax's chunked form, for leaves msgpack cannot hold
            step = max(1, MAX_CHUNK_BYTES // arr.dtype.itemsize)
            flat = arr.reshape(-1)
            chunks = {str(i): flat[s : s + step] for i, s in enumerate(range(0, flat.size, step))}
            out.write(packer.pack_map_header(3))
            out.write(packer.pack(_CHUNKED))
            out.write(packer.pack(True))
            out.write(packer.pack("shape"))
            out.write(packer.pack({str(i): int(d) for i, d in enumerate(arr.shape)}))
            out.write(packer.pack("chunks"))
            _write_tree(out, packer, chunks)
            continue
        _write_array(out, packer, arr)
        del arr


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def write_flax_msgpack(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    config: OPTConfig,
    head: Head | str = Head.CAUSAL_LM,
) -> Path:
    """Write canonical tensors as a Hugging Face `flax_model.msgpack` (loadable by
    `FlaxOPTForCausalLM` / `FlaxOPTModel` 4.57.6), byte for byte what Hugging Face writes.

    Streams: the tree is written in Flax's (sorted) order, loading one tensor at a time, and each
    tensor's bytes go straight from its buffer to the file. Peak memory: the tensor being written
    plus, for Linear weights, one reused [in, out] kernel buffer (none when the array's memory is
    already [in, out], i.e. Fortran order).

    Args:
        path: the file to write (written under a temporary name, then renamed).
        tensors: canonical name -> array in canonical (torch) layout; every parameter of
            `parameter_table(config, head)` must be present, except a tied `lm_head.weight`
            (Hugging Face Flax does not store it). Values may be callables returning the array,
            so a converter can load lazily; each is called once.
        config: the model's config.
        head: which model the tensors belong to.
    Raises:
        CheckpointError: a tensor is missing, unexpected or has the wrong shape.
    """
    import msgpack

    path = Path(path)
    head = Head(head)
    table = parameter_table(config, head)
    by_name = {s.name: s for s in table}
    unexpected = [k for k in tensors if k not in by_name]
    missing = [s.name for s in table if s.name not in tensors and s.tied_to is None]
    if unexpected or missing:
        raise CheckpointError(
            f"cannot write {path}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    scratch = Scratch()  # one buffer for every transposed kernel
    seen: list[np.dtype] = []  # the first tensor's dtype, for the identity extras
    flat: dict[tuple[str, ...], Any] = {}
    for spec in table:
        if spec.tied_to is not None:
            continue  # HF Flax reads the tied lm_head from the embedding
        value = tensors[spec.name]

        def load(value: Any = value, spec: ParamSpec = spec) -> np.ndarray:
            arr = np.asarray(value() if callable(value) else value)
            if tuple(arr.shape) != spec.shape:
                raise CheckpointError(
                    f"cannot write {path}: {spec.name} has shape {list(arr.shape)}, the config implies "
                    f"{list(spec.shape)}"
                )
            if not seen:
                seen.append(arr.dtype)
            # canonical [out, in] -> Flax kernel [in, out]
            return kernel_layout(arr, scratch) if spec.role is Role.LINEAR_WEIGHT else arr

        flat[flax_path(spec, head)] = load
    embedding = flat[flax_path(by_name["decoder.embed_tokens.weight"], head)]
    for name, (shape, value) in identity_extras(config).items():

        def extra(shape: tuple[int, ...] = shape, value: float = value) -> np.ndarray:
            if not seen:  # no tensor written yet (the sorted tree puts the embeddings first)
                seen.append(_first_dtype(tensors, embedding))
            return np.full(shape, value, dtype=seen[0])

        extra_spec = ParamSpec(name, shape, Role.NORM_WEIGHT if value == 1.0 else Role.LINEAR_BIAS)
        flat[flax_path(extra_spec, head)] = extra

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            _write_tree(out, msgpack.Packer(use_bin_type=True), _nest(flat))
        final_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _first_dtype(tensors: Mapping[str, Any], load_embedding: Any) -> np.dtype:
    """The dtype of the first array given directly, else of the (lazily loaded) embedding."""
    for value in tensors.values():
        if not callable(value):
            return np.asarray(value).dtype
    return load_embedding().dtype


class FlaxMsgpackWriter(Writer):
    """Writes `flax_model.msgpack` in Hugging Face's tree layout, one tensor at a time, with no copy
    of a tensor beyond one reused [in, out] kernel buffer (see `write_flax_msgpack`)."""

    fmt = "flax-msgpack"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def lazy(name: str) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                arr = fetch(name)
                self._check(name, arr)
                return arr

            return load

        write_flax_msgpack(self.folder / FLAX_MSGPACK, {p.spec.name: lazy(p.spec.name) for p in self.plan},
                           self.config, self.head)

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / FLAX_MSGPACK]
