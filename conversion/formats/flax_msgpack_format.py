"""Hugging Face `flax_model.msgpack`, through `opt_core.formats.flax_msgpack` (the one place Flax
paths live).

Reading parses the file through a read-only memory map and copies one tensor out per call; the map
is closed after each call, so its pages do not accumulate in the resident set. Writing packs the
tree incrementally, pulling one tensor at a time; msgpack's ext record needs the tensor's bytes
twice more (`tobytes` and the packed record), so peak memory is about 3 x the largest tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conversion.formats.base import Reader, Writer
from opt_core.checkpoint import FLAX_MSGPACK
from opt_core.config import OPTConfig
from opt_core.formats.flax_msgpack import flax_msgpack_shapes, read_flax_msgpack, write_flax_msgpack


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

    def read(self, key: str) -> np.ndarray:
        for _, arr in read_flax_msgpack(self._file, {key}, self.layout_config):
            return arr
        raise KeyError(f"{self._file} holds no {key}")


class FlaxMsgpackWriter(Writer):
    """Writes `flax_model.msgpack` in Hugging Face's tree layout, packing incrementally.
    Memory: about 3 x the largest tensor (see the module docstring)."""

    fmt = "flax-msgpack"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def lazy(name: str) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                arr = fetch(name)
                self._check(name, arr)
                return self._kernel_ready(name, arr)

            return load

        write_flax_msgpack(self.folder / FLAX_MSGPACK, {p.spec.name: lazy(p.spec.name) for p in self.plan},
                           self.config, self.head)

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / FLAX_MSGPACK]
