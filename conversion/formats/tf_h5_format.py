"""Hugging Face `tf_model.h5`, through `opt_core.formats.tf_h5` (the one place TF paths live).

Both directions stream through h5py one dataset at a time. Writing holds one tensor plus its
transposed copy (Keras kernels are [in, out]). Hugging Face's TF OPT never stores the tied LM head.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from conversion.formats.base import LazyTensors, Reader, Writer
from opt_core.checkpoint import TF_H5
from opt_core.formats.tf_h5 import read_tf_h5, tf_h5_shapes, write_tf_h5


def _bf16(dtype: np.dtype) -> np.dtype:
    """h5py has no bfloat16: it stores ml_dtypes/TF bfloat16 as 2-byte opaque (`|V2`); read it back
    as bfloat16, the only 2-byte opaque float Keras writes."""
    return np.dtype(ml_dtypes.bfloat16) if dtype.kind == "V" and dtype.itemsize == 2 else dtype


class TfH5Reader(Reader):
    """A folder holding `tf_model.h5`, or the `.h5` file itself."""

    fmt = "tf-h5"

    def __init__(self, path: str | os.PathLike[str]):
        path = Path(path)
        file = path if path.is_file() else path / TF_H5
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {TF_H5}")
        super().__init__(path, [file])
        self._file = file
        self._shapes = tf_h5_shapes(file)
        self._dtypes: dict[str, np.dtype] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self, key: str) -> np.dtype:
        if not self._dtypes:
            # dataset headers only; the path walk is tf_h5's own (its private helpers, read-only use)
            from opt_core.formats.tf_h5 import _entries, _open

            with _open(self._file) as f:
                self._dtypes = {k: _bf16(np.dtype(f[ds].dtype)) for k, ds in _entries(f, self._file)}
        return self._dtypes[key]

    def read(self, key: str) -> np.ndarray:
        for _, arr in read_tf_h5(self._file, {key}):
            return arr.view(_bf16(arr.dtype))
        raise KeyError(f"{self._file} holds no {key}")


class TfH5Writer(Writer):
    """Writes `tf_model.h5` in Hugging Face's Keras-2 layout. Memory: one tensor and its transpose."""

    fmt = "tf-h5"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def checked(name: str) -> np.ndarray:
            arr = fetch(name)
            self._check(name, arr)
            return self._kernel_ready(name, arr)

        write_tf_h5(self.folder / TF_H5, LazyTensors((p.spec.name for p in self.plan), checked),
                    self.config, self.head)

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / TF_H5]  # write_tf_h5 already renamed its temporary file
