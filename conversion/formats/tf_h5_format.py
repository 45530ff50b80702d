"""Hugging Face `tf_model.h5`, through `opt_core.formats.tf_h5` (the one place TF paths live).

Reading opens the file once (`TFH5Reader`) and reads each dataset straight into the caller's buffer
(Keras kernels through one reused [in, out] buffer). Writing streams through `write_tf_h5`: one
tensor plus, for kernels, one reused transposed buffer. Hugging Face's TF OPT never stores the tied
LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from conversion.formats.base import FrameworkFileReader, LazyTensors, Writer
from opt_core.checkpoint import TF_H5
from opt_core.config import OPTConfig
from opt_core.formats.tf_h5 import TFH5Reader, write_tf_h5
from opt_core.params import Head


class TfH5Reader(FrameworkFileReader):
    """A folder holding `tf_model.h5`, or the `.h5` file itself (see `FrameworkFileReader`)."""

    fmt = "tf-h5"
    file_name = TF_H5
    reader_class = TFH5Reader


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
