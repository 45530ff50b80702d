"""Hugging Face `flax_model.msgpack`, through `opt_core.formats.flax_msgpack` (the one place Flax
paths live).

Reading parses the file once (`FlaxMsgpackReader`: a read-only memory map, closed after the parse)
and then reads each tensor by file offset straight into the caller's buffer, so mapped pages never
accumulate in the resident set. Writing streams through `write_flax_msgpack`, pulling one tensor at
a time and writing its bytes straight from its buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from conversion.formats.base import FrameworkFileReader, Writer
from opt_core.checkpoint import FLAX_MSGPACK
from opt_core.formats import flax_msgpack


class FlaxMsgpackReader(FrameworkFileReader):
    """A folder holding `flax_model.msgpack`, or the file itself (see `FrameworkFileReader`)."""

    fmt = "flax-msgpack"
    file_name = FLAX_MSGPACK
    reader_class = flax_msgpack.FlaxMsgpackReader


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
