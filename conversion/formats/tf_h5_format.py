"""Hugging Face `tf_model.h5`, through `opt_core.formats.tf_h5` (the one place TF paths live).

Reading opens the file once (`TFH5Reader`) and reads each dataset straight into the caller's buffer
(Keras kernels through one reused [in, out] buffer). Writing streams through `write_tf_h5`: one
tensor plus, for kernels, one reused transposed buffer. Hugging Face's TF OPT never stores the tied
LM head.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conversion.formats.base import LazyTensors, Reader, Writer
from opt_core.checkpoint import TF_H5
from opt_core.config import OPTConfig
from opt_core.formats.tf_h5 import TFH5Reader, write_tf_h5
from opt_core.params import Head


class TfH5Reader(Reader):
    """A folder holding `tf_model.h5`, or the `.h5` file itself. The converter sets `layout_config`
    before calling `shapes()`: with it, the identity biases/gammas Hugging Face TF stores for configs
    without them are hidden, and verified before the first tensor is read."""

    fmt = "tf-h5"

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None):
        path = Path(path)
        file = path if path.is_file() else path / TF_H5
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {TF_H5}")
        super().__init__(path, [file])
        self._file = file
        self.layout_config = config
        self._reader: TFH5Reader | None = None
        self._checked = False

    def _open(self) -> TFH5Reader:
        if self._reader is not None and self._reader.config is not self.layout_config:
            self.close()  # opened before the converter set the config: hide the extras now
        if self._reader is None:
            self._reader = TFH5Reader(self._file, self.layout_config)
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


class TfH5Writer(Writer):
    """Writes `tf_model.h5` in Hugging Face's Keras-2 layout. Memory: one tensor and one reused
    transposed kernel buffer."""

    fmt = "tf-h5"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def checked(name: str) -> np.ndarray:
            arr = fetch(name)
            self._check(name, arr)
            return arr

        write_tf_h5(self.folder / TF_H5, LazyTensors((p.spec.name for p in self.plan), checked), self.config,
                    self.head)

    @classmethod
    def check_model(cls, config: OPTConfig, head: Head) -> None:
        if head is Head.CAUSAL_LM and not config.tie_word_embeddings:
            raise ValueError(
                "Hugging Face's TFOPTForCausalLM always ties lm_head to embed_tokens; a model with "
                "tie_word_embeddings=false cannot be written as tf_model.h5 (use safetensors, bin or flax-msgpack)"
            )

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / TF_H5]  # write_tf_h5 already renamed its temporary file
