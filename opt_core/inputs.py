"""Checks on model inputs, shared by every backend so each bad input gets the same clear error."""

from __future__ import annotations

import warnings

import numpy as np

from opt_core.config import OPTConfig

# Hugging Face's words (GenerationMixin.generate), so a user searching for them finds the cause.
RIGHT_PADDING_WARNING = (
    "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
    "results, please set `padding_side='left'` when initializing the tokenizer."
)


def validate_inputs(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    config: OPTConfig,
    past_length: int = 0,
    generating: bool = False,
) -> None:
    """Raise `ValueError` naming the problem when the inputs cannot be run by `config`'s model.

    Args:
        input_ids: [batch, seq] integer token ids (the new tokens only when decoding with a cache).
        attention_mask: None, or [batch, past_length + seq] of 0/1.
        config: the model's config.
        past_length: tokens already held in the cache.
        generating: the inputs are prompts for `generate`: right padding then gets Hugging Face's
            warning (a new token would follow padding, so the row continues differently from the same
            prompt padded on the left), as in every backend.
    Warns:
        UserWarning: `RIGHT_PADDING_WARNING`, when `generating` and a row ends in padding.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one token per row")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = ids[(ids < 0) | (ids >= config.vocab_size)]
        raise ValueError(
            f"token id {int(bad.flat[0])} is outside the vocabulary [0, {config.vocab_size})"
        )
    total = past_length + ids.shape[1]
    if total > config.max_position_embeddings:
        raise ValueError(
            f"sequence of {total} tokens is longer than max_position_embeddings "
            f"({config.max_position_embeddings}); truncate the prompt or generate fewer tokens"
        )
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != (ids.shape[0], total):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; expected "
                f"{(ids.shape[0], total)} (batch, cached + new tokens)"
            )
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
    if generating:
        warn_if_right_padded(ids, None if attention_mask is None else np.asarray(attention_mask), config)


def warn_if_right_padded(ids: np.ndarray, mask: np.ndarray | None, config: OPTConfig) -> bool:
    """Warn (`RIGHT_PADDING_WARNING`) when a prompt row ends in padding; returns whether it did.

    With a mask, a row whose last position is masked is right-padded (whatever the batch size).
    Without one, Hugging Face's own test: a batch of several rows where some row ends in the pad id.
    """
    if mask is not None:
        padded = bool((mask[:, -1] == 0).any())
    else:
        pad = config.pad_token_id
        padded = pad is not None and ids.shape[0] > 1 and bool((ids[:, -1] == pad).any())
    if padded:
        warnings.warn(RIGHT_PADDING_WARNING, UserWarning, stacklevel=4)
    return padded
