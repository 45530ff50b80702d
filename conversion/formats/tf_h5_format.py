"""Hugging Face `tf_model.h5`, through `opt_core.formats.tf_h5` (the one place TF paths live).

Both directions stream through h5py one dataset at a time. Writing holds one tensor plus its
transposed copy (Keras kernels are [in, out]). Hugging Face's TF OPT never stores the tied LM head.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from conversion.formats.base import LazyTensors, Reader, Scratch, Writer, fast_transpose
from opt_core.checkpoint import TF_H5
from opt_core.config import OPTConfig
from opt_core.formats.flax_msgpack import identity_extras
from opt_core.formats.tf_h5 import read_tf_h5, tf_h5_shapes, write_tf_h5
from opt_core.params import Head


def _bf16(dtype: np.dtype) -> np.dtype:
    """h5py has no bfloat16: it stores ml_dtypes/TF bfloat16 as 2-byte opaque (`|V2`); read it back
    as bfloat16, the only 2-byte opaque float Keras writes."""
    return np.dtype(ml_dtypes.bfloat16) if dtype.kind == "V" and dtype.itemsize == 2 else dtype


class TfH5Reader(Reader):
    """A folder holding `tf_model.h5`, or the `.h5` file itself. The converter sets `layout_config`
    before calling `shapes()` (see `FlaxMsgpackReader`)."""

    fmt = "tf-h5"

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None):
        path = Path(path)
        file = path if path.is_file() else path / TF_H5
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no {TF_H5}")
        super().__init__(path, [file])
        self._file = file
        self.layout_config = config
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self._h5 = None

    def _config_kw(self) -> dict:
        # The identity biases/gammas HF TF stores for configs without them are dropped (and checked)
        # by tf_h5 when it is given the config.
        if self.layout_config is None or "config" not in inspect.signature(tf_h5_shapes).parameters:
            return {}
        return {"config": self.layout_config}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = tf_h5_shapes(self._file, **self._config_kw())
        return dict(self._shapes)

    def dtype(self, key: str) -> np.dtype:
        if not self._dtypes:
            # dataset headers only; the path walk is tf_h5's own (its private helpers, read-only use)
            from opt_core.formats.tf_h5 import _entries, _open

            with _open(self._file) as f:
                self._dtypes = {k: _bf16(np.dtype(f[ds].dtype)) for k, ds in _entries(f, self._file)}
        return self._dtypes[key]

    def _open_datasets(self) -> None:
        """Open the file once and map key -> dataset. `read_tf_h5` reopens the file and walks every
        entry per call, which is quadratic over a checkpoint read one tensor at a time; this is its
        loop body for one key (the identity extras it verifies are checked once, here)."""
        from opt_core.formats.tf_h5 import _entries, _is_kernel, _open

        for _ in read_tf_h5(self._file, set(), **self._config_kw()):  # verifies the extras, yields nothing
            pass
        self._h5 = _open(self._file)
        self._datasets = {k: (ds, _is_kernel(ds)) for k, ds in _entries(self._h5, self._file)}
        self._raw = Scratch()

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        if self._h5 is None:
            self._open_datasets()
        if key not in self._datasets:
            raise KeyError(f"{self._file} holds no {key}")
        ds_path, kernel = self._datasets[key]
        ds = self._h5[ds_path]
        dtype = _bf16(np.dtype(ds.dtype))
        shape = tuple(int(d) for d in ds.shape)
        transposed = kernel and len(shape) == 2
        target = shape[::-1] if transposed else shape
        if out is None or out.shape != target or out.dtype != dtype or not out.flags.c_contiguous:
            out = np.empty(target, dtype=dtype)
        raw = self._raw.array(shape, np.dtype(ds.dtype)) if transposed else out.view(np.dtype(ds.dtype))
        if raw.size:
            ds.read_direct(raw)
        if transposed:
            fast_transpose(raw.view(dtype), out=out)  # Keras kernel [in, out] -> canonical [out, in]
        return out

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


class TfH5Writer(Writer):
    """Writes `tf_model.h5` in Hugging Face's Keras-2 layout. Memory: one tensor and its transpose."""

    fmt = "tf-h5"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def checked(name: str) -> np.ndarray:
            arr = fetch(name)
            self._check(name, arr)
            return self._kernel_ready(name, arr)

        # For configs without biases / LayerNorm affine, tf_h5 writes constant stand-ins in the dtype
        # of the first tensor, which it indexes once per stand-in: keep that tensor instead of
        # re-reading it each time.
        has_extras = self._keeps_first = bool(identity_extras(self.config))
        write_tf_h5(self.folder / TF_H5, LazyTensors((p.spec.name for p in self.plan), checked, keep_first=has_extras),
                    self.config, self.head)

    @classmethod
    def check_model(cls, config: OPTConfig, head: Head) -> None:
        if head is Head.CAUSAL_LM and not config.tie_word_embeddings:
            raise ValueError(
                "Hugging Face's TFOPTForCausalLM always ties lm_head to embed_tokens; a model with "
                "tie_word_embeddings=false cannot be written as tf_model.h5 (use safetensors, bin or flax-msgpack)"
            )

    def reuses_fetched_arrays(self) -> bool:
        return not identity_extras(self.config)  # the kept first tensor must not be overwritten

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / TF_H5]  # write_tf_h5 already renamed its temporary file
