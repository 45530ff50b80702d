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

The reader parses the file through `mmap` and copies one tensor at a time, so reading never needs
the whole checkpoint in memory twice.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.checkpoint import CheckpointError
from opt_core.config import OPTConfig
from opt_core.params import Head, ParamSpec, Role, parameter_table

FLAX_MSGPACK = "flax_model.msgpack"
_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
MAX_CHUNK_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE


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
class _ArrayRef:
    """A tensor inside the mapped file, not yet copied."""

    shape: tuple[int, ...]
    dtype: np.dtype
    data: memoryview | None = None  # raw bytes (a single leaf)
    chunks: list[_ArrayRef] | None = None  # a chunked leaf

    def load(self) -> np.ndarray:
        if self.chunks is not None:
            flat = np.concatenate([c.load().reshape(-1) for c in self.chunks])
            return flat.reshape(self.shape)
        assert self.data is not None
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape).copy()


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _Parser:
    """A minimal msgpack decoder over a buffer: maps, arrays, scalars, strings; `bin` payloads are
    returned as zero-copy memoryviews and ext ndarrays as `_ArrayRef`s."""

    def __init__(self, buf: memoryview, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.source} is truncated (needed {n} bytes at offset {self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def _int(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big", signed=True)

    def value(self) -> Any:
        b = self._uint(1)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return str(self._take(b & 0x1F), "utf-8")
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):
            return self._take(self._uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[b]))
        if b in (0xC7, 0xC8, 0xC9):
            n = self._uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
            return self._ext(self._int(1), self._take(n))
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
            return self._ext(code, self._take(1 << (b - 0xD4)))
        if 0xD9 <= b <= 0xDB:
            return str(self._take(self._uint(1 << (b - 0xD9))), "utf-8")
        if b in (0xDC, 0xDD):
            return [self.value() for _ in range(self._uint(2 if b == 0xDC else 4))]
        if b in (0xDE, 0xDF):
            return self._map(self._uint(2 if b == 0xDE else 4))
        raise CheckpointError(f"{self.source}: unsupported msgpack byte 0x{b:02x} at offset {self.pos - 1}")

    def _map(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value()
            out[str(key)] = self.value()
        return out

    def _ext(self, code: int, payload: memoryview) -> Any:
        if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
            raise CheckpointError(f"{self.source}: unsupported msgpack ext type {code}")
        inner = _Parser(payload, self.source).value()
        if not (isinstance(inner, list) and len(inner) == 3):
            raise CheckpointError(f"{self.source}: malformed array record")
        shape, dtype_name, data = inner
        if isinstance(dtype_name, memoryview):
            dtype_name = str(dtype_name, "utf-8")
        return _ArrayRef(tuple(int(d) for d in shape), _dtype(dtype_name), data=data)


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED) is True:
            shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return _ArrayRef(shape, chunks[0].dtype, chunks=chunks)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def _leaves(tree: Any, prefix: tuple[str, ...], source: str) -> Iterator[tuple[tuple[str, ...], _ArrayRef]]:
    if isinstance(tree, _ArrayRef):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key), source)
    else:
        raise CheckpointError(f"{source}: {'/'.join(prefix)} holds a {type(tree).__name__}, not an array")


class _MappedFile:
    """Context manager: the file mapped read-only, parsed into (flax path, _ArrayRef) leaves."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __enter__(self) -> list[tuple[tuple[str, ...], _ArrayRef]]:
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"no Flax checkpoint at {self.path}") from None
        if os.fstat(self._file.fileno()).st_size == 0:
            self._file.close()
            raise CheckpointError(f"{self.path} is empty")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._map)
        parser = _Parser(self._view, str(self.path))
        tree = _unchunk(parser.value())
        if not isinstance(tree, dict):
            raise CheckpointError(f"{self.path} does not hold a parameter tree")
        if "params" in tree and isinstance(tree["params"], dict) and len(tree) == 1:
            tree = tree["params"]  # a file written from {"params": ...} variables
        self.leaves = list(_leaves(tree, (), str(self.path)))
        return self.leaves

    def __exit__(self, *exc: Any) -> None:
        del self.leaves  # drop our memoryviews into the map before closing it
        try:
            self._view.release()
            self._map.close()
        except BufferError:  # a caller still holds a view; the map closes when it is collected
            pass
        self._file.close()


def _canonical_leaves(
    leaves: list[tuple[tuple[str, ...], _ArrayRef]], source: str
) -> dict[str, tuple[_ArrayRef, bool, tuple[str, ...]]]:
    out: dict[str, tuple[_ArrayRef, bool, tuple[str, ...]]] = {}
    for path, ref in leaves:
        name, transposed = canonical_from_flax(path)
        if transposed and len(ref.shape) != 2:
            raise CheckpointError(f"{source}: {'/'.join(path)} is a kernel of shape {list(ref.shape)}, not 2-D")
        if name in out:
            raise CheckpointError(
                f"{source}: {'/'.join(out[name][2])} and {'/'.join(path)} both map to {name}"
            )
        out[name] = (ref, transposed, path)
    return out


def _canonical_shape(ref: _ArrayRef, transposed: bool) -> tuple[int, ...]:
    return tuple(reversed(ref.shape)) if transposed else ref.shape


# ---------------------------------------------------------------- public read API
def flax_msgpack_shapes(
    path: str | os.PathLike[str], config: OPTConfig | None = None
) -> dict[str, tuple[int, ...]]:
    """Canonical name -> canonical (torch-layout) shape of every tensor in a Flax msgpack file.

    With `config`, the identity tensors Hugging Face Flax adds for configs without biases or
    LayerNorm affine parameters are left out (their values are checked by `read_flax_msgpack`).
    Feed the result to `opt_core.checkpoint.account_keys` for strict accounting.
    """
    extras = identity_extras(config) if config is not None else {}
    with _MappedFile(path) as leaves:
        table = _canonical_leaves(leaves, str(path))
        return {n: _canonical_shape(r, t) for n, (r, t, _) in table.items() if n not in extras}


def read_flax_msgpack(
    path: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    config: OPTConfig | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, NumPy array in canonical torch layout), one tensor at a time.

    Args:
        path: the `flax_model.msgpack` file.
        names: only these canonical names (default: all).
        config: when given, identity extras (see `identity_extras`) are verified and skipped.
    Raises:
        CheckpointError: malformed file, or an identity extra that is not 0 / 1.
    """
    wanted = set(names) if names is not None else None
    extras = identity_extras(config) if config is not None else {}
    with _MappedFile(path) as leaves:
        table = _canonical_leaves(leaves, str(path))
        for name, (ref, transposed, fpath) in table.items():
            if name in extras:
                shape, value = extras[name]
                arr = ref.load()
                if arr.shape != shape or not np.all(arr == value):
                    raise CheckpointError(
                        f"{path}: {'/'.join(fpath)} must be all {value:g} (the config has "
                        f"enable_bias={config.enable_bias}, layer_norm_elementwise_affine="  # type: ignore[union-attr]
                        f"{config.layer_norm_elementwise_affine}), but it holds other values"  # type: ignore[union-attr]
                    )
                continue
            if wanted is not None and name not in wanted:
                continue
            arr = ref.load()
            yield name, (np.ascontiguousarray(arr.T) if transposed else arr)


# ---------------------------------------------------------------- write side
def _record(arr: np.ndarray) -> bytes:
    import msgpack

    arr = np.ascontiguousarray(arr)
    return msgpack.packb((list(arr.shape), arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _pack_tree(packer: Any, out: Any, tree: dict[str, Any]) -> None:
    import msgpack

    out.write(packer.pack_map_header(len(tree)))
    for key, value in sorted(tree.items()):  # sorted, as Flax's own writer emits them
        out.write(packer.pack(key))
        if isinstance(value, dict):
            _pack_tree(packer, out, value)
            continue
        arr = value() if callable(value) else value
        if arr.nbytes > MAX_CHUNK_BYTES:  # Flax's chunked form, for leaves msgpack cannot hold
            step = max(1, MAX_CHUNK_BYTES // arr.dtype.itemsize)
            flat = arr.reshape(-1)
            chunks = {str(i): flat[s : s + step] for i, s in enumerate(range(0, flat.size, step))}
            chunked = {_CHUNKED: True, "shape": {str(i): int(d) for i, d in enumerate(arr.shape)}, "chunks": chunks}
            out.write(packer.pack_map_header(3))
            out.write(packer.pack(_CHUNKED))
            out.write(packer.pack(True))
            out.write(packer.pack("shape"))
            out.write(packer.pack(chunked["shape"]))
            out.write(packer.pack("chunks"))
            _pack_tree(packer, out, chunks)
            continue
        out.write(packer.pack(msgpack.ExtType(_EXT_NDARRAY, _record(arr))))


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
    tensors: Mapping[str, np.ndarray],
    config: OPTConfig,
    head: Head | str = Head.CAUSAL_LM,
) -> Path:
    """Write canonical tensors as a Hugging Face `flax_model.msgpack` (loadable by
    `FlaxOPTForCausalLM` / `FlaxOPTModel` 4.57.6).

    Args:
        path: the file to write (written under a temporary name, then renamed).
        tensors: canonical name -> array in canonical (torch) layout; every parameter of
            `parameter_table(config, head)` must be present, except a tied `lm_head.weight`
            (Hugging Face Flax does not store it). Values may be callables returning the array,
            so a converter can load lazily.
        config: the model's config.
        head: which model the tensors belong to.
    Raises:
        CheckpointError: a tensor is missing, unexpected or has the wrong shape.
    """
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
            return np.ascontiguousarray(arr.T) if spec.role is Role.LINEAR_WEIGHT else arr

        flat[flax_path(spec, head)] = load
    dtype = _first_float_dtype(tensors)
    for name, (shape, value) in identity_extras(config).items():
        extra_spec = ParamSpec(name, shape, Role.NORM_WEIGHT if value == 1.0 else Role.LINEAR_BIAS)
        flat[flax_path(extra_spec, head)] = np.full(shape, value, dtype=dtype)
    import msgpack

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    packer = msgpack.Packer(use_bin_type=True)
    try:
        with open(tmp, "wb") as out:
            _pack_tree(packer, out, _nest(flat))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _first_float_dtype(tensors: Mapping[str, Any]) -> np.dtype:
    for value in tensors.values():
        if not callable(value):
            return np.asarray(value).dtype
    return np.dtype(np.float32)
