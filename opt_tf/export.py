"""Export `OPTForCausalLM` as a TensorFlow SavedModel that serves generation.

The serving signature takes `input_ids` [B, T] int64, `attention_mask` [B, T] int64 and
`max_new_tokens` (int64 scalar) and returns `sequences` [B, T + generated] int64, prompt included:
the dtypes the tokenizer and `generate` use, so their outputs feed the signature unchanged. The
compiled loop itself runs on int32 ids (every OPT vocabulary fits), cast at the signature's edge.
Batch and prompt length are free: the XLA-compiled decode loop (`opt_tf.generation`) is traced
once with unknown shapes and compiled per concrete shape when called. The static cache has
`max_length` slots, so T + max_new_tokens is capped at `max_length` (extra tokens are not made).

    export_saved_model(model, "served/", max_length=256)
    served = tf.saved_model.load("served/")
    served.signatures["serving_default"](input_ids=ids, attention_mask=mask,
                                         max_new_tokens=tf.constant(32, tf.int64))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tensorflow as tf

from opt_tf.generation import GenerationSettings, compiled_generate_fn, knobs

SERVING_KEY = "serving_default"


def export_saved_model(
    model: Any,
    folder: str | os.PathLike[str],
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_beams: int = 1,
    seed: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> Path:
    """Write `model` (an `OPTForCausalLM`) as a SavedModel with a generation serving signature.

    Args:
        folder: the SavedModel directory to write.
        max_length: slots of the static cache, i.e. the most prompt + new tokens one call can hold
            (default: the config's max_position_embeddings).
        do_sample ... early_stopping: the decoding strategy baked into the export (see
            `opt_tf.generation.generate`).
    Returns:
        The folder. Load it with `tf.saved_model.load(folder)` (no opt_tf needed).
    """
    cfg = model.config
    max_length = cfg.max_position_embeddings if max_length is None else int(max_length)
    if not 1 < max_length <= cfg.max_position_embeddings:
        raise ValueError(f"max_length must be in (1, {cfg.max_position_embeddings}], got {max_length}")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
    eos = () if cfg.eos_token_id is None else (int(cfg.eos_token_id),)
    settings = GenerationSettings(
        total_length=max_length, do_sample=do_sample, top_k=top_k if do_sample else 0, num_beams=num_beams,
        num_eos=0 if cfg.eos_token_id is None else 1, early_stopping=early_stopping,
    )
    generate_fn = compiled_generate_fn(model, settings)

    module = tf.Module()
    module.weights = [getattr(v, "value", v) for v in model.weights]  # the tf.Variables to save

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int64, name="input_ids"),
            tf.TensorSpec([None, None], tf.int64, name="attention_mask"),
            tf.TensorSpec([], tf.int64, name="max_new_tokens"),
        ]
    )
    def serve(input_ids: tf.Tensor, attention_mask: tf.Tensor, max_new_tokens: tf.Tensor) -> dict[str, tf.Tensor]:
        tokens, produced = generate_fn(
            tf.cast(input_ids, tf.int32), tf.cast(attention_mask, tf.int32), tf.cast(max_new_tokens, tf.int32),
            knobs(seed, temperature, top_p, 1.0, 0, eos, pad, length_penalty),
        )
        return {"sequences": tf.cast(tokens[:, : tf.shape(input_ids)[1] + produced], tf.int64)}

    module.serve = serve
    folder = Path(folder)
    tf.saved_model.save(module, str(folder), signatures={SERVING_KEY: serve})
    return folder
