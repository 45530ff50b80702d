"""Hugging Face `flax_model.msgpack`, through `opt_core.formats.flax_msgpack` (the one place Flax
paths live).

Reading parses the file once (`FlaxMsgpackReader`: a read-only memory map, closed after the parse)
and then reads each tensor by file offset straight into the caller's buffer, so mapped pages never
accumulate in the resident set. Writing streams through `write_flax_msgpack`, pulling one tensor at
a time and writing its bytes straight from its buffer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conversion.formats.base import Reader, Writer
from opt_core.checkpoint import FLAX_MSGPACK
from opt_core.config import OPTConfig
from opt_core.formats import flax_msgpack


class FlaxMsgpackReader(Reader):
    """A folder holding `flax_model.msgpack`, or the file itself. The converter sets `layout_config`
    before calling `shapes()`: with it, the identity biases/scales Hugging Face Flax stores for
    no-bias / no-affine configs are hidden, and verified before the first tensor is read."""

    fmt = "flax-msgpack"

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None):
        path = Path(path)
        file = path if path.is_file() else path / FLAX_MSGPACK
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {FLAX_MSGPACK}")
        super().__init__(path, [file])
        self._file = file
        self.layout_config = config
        self._reader: flax_msgpack.FlaxMsgpackReader | None = None
        self._checked = False

    def _open(self) -> flax_msgpack.FlaxMsgpackReader:
        if self._reader is not None and self._reader.config is not self.layout_config:
            self.close()  # opened before the converter set the config: hide the extras now
        if self._reader is None:
            self._reader = flax_msgpack.FlaxMsgpackReader(self._file, self.layout_config)
        return self._reader

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._open().shapes()

    def dtype(self, key: str) -> np.dtype:
        return self._open().dtype(key)

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        reader = self._open()
        if not self._checked:
            reader.check_identity_extras()
            self._checked = True
        return reader.read(key, out)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


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

        flax_msgpack.write_flax_msgpack(self.folder / FLAX_MSGPACK, {p.spec.name: lazy(p.spec.name) for p in self.plan},
                                        self.config, self.head)

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / FLAX_MSGPACK]
