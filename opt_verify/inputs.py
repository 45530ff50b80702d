"""The batch `opt verify` runs through every implementation: prompts through the folder's tokenizer,
given ids, or deterministic ids, left-padded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opt_core import OPTConfig, OPTTokenizer
from opt_core.tokenizer import MERGES_FILE, VOCAB_FILE

DEFAULT_PROMPTS = (
    "Hello, my dog is cute",
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that changed",
)


class VerifyError(ValueError):
    """Bad input to `verify` (missing folder, unknown backend or dtype, unusable prompts)."""


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists of different lengths: (input_ids, attention_mask), both [batch, max_len] int64."""
    if not rows or any(len(r) == 0 for r in rows):
        raise VerifyError("every input row needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = np.asarray(row, dtype=np.int64)
        mask[i, width - len(row):] = 1
    return ids, mask


def default_ids(config: OPTConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 9, 5 and 7 tokens, left-padded, each starting with `</s>`: deterministic ids
    for folders without a tokenizer."""
    rng = np.random.default_rng(seed)
    low = min(4, config.vocab_size - 1)
    rows = [[config.bos_token_id, *rng.integers(low, config.vocab_size, n - 1).tolist()] for n in (9, 5, 7)]
    return left_pad(rows, config.pad_token_id)


# verify runs the whole batch through every implementation at once (the float64 reference included)
# and keeps every hidden state for the per-layer comparison: its memory and time grow with rows x
# length, so the batch is bounded and the limit names itself rather than the run going silent.
MAX_ROWS = 64
MAX_BATCH_TOKENS = 16_384


def check_batch_size(ids: np.ndarray) -> None:
    """VerifyError when the batch is larger than `MAX_ROWS` rows or `MAX_BATCH_TOKENS` tokens."""
    rows, length = ids.shape
    if rows > MAX_ROWS or rows * length > MAX_BATCH_TOKENS:
        raise VerifyError(
            f"{rows} prompts of up to {length} tokens ({rows * length:,} tokens) exceed what one verify run "
            f"compares (at most {MAX_ROWS} prompts and {MAX_BATCH_TOKENS:,} tokens: every implementation runs "
            "them as one batch and keeps every layer's hidden states); split the prompts over several runs"
        )


def build_inputs(
    model_dir: Path,
    config: OPTConfig,
    prompts: Sequence[str] | None,
    input_ids: Any,
    attention_mask: Any,
    tokenizer_dir: str | os.PathLike[str] | None,
) -> tuple[np.ndarray, np.ndarray, str, list[str] | None]:
    """The batch every implementation runs: (ids, mask, source, prompts)."""
    if prompts is not None and input_ids is not None:
        raise VerifyError("give prompts or input_ids, not both")
    if input_ids is not None:
        if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
            ids = input_ids.astype(np.int64)
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        else:
            ids, mask = left_pad([list(map(int, r)) for r in input_ids], config.pad_token_id)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise VerifyError(
                f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]"
            )
        source = "input_ids"
        texts = None
    else:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
        has_tokenizer = (tok_dir / VOCAB_FILE).is_file() and (tok_dir / MERGES_FILE).is_file()
        if prompts is not None and not has_tokenizer:
            raise VerifyError(
                f"prompts need a tokenizer, but {tok_dir} has no {VOCAB_FILE} + {MERGES_FILE}; "
                "pass tokenizer_dir (--tokenizer) or input_ids"
            )
        if has_tokenizer:
            texts = list(prompts if prompts is not None else DEFAULT_PROMPTS)
            if not texts or not all(isinstance(t, str) and t for t in texts):
                raise VerifyError("prompts must be a non-empty list of non-empty strings")
            if len(texts) > MAX_ROWS:  # before tokenizing thousands of lines
                check_batch_size(np.zeros((len(texts), 1), np.int64))
            tok = OPTTokenizer.from_pretrained(tok_dir)
            rows = [tok.encode(t) for t in texts]
            ids, mask = left_pad(rows, config.pad_token_id)
            source = "prompts"
        else:
            ids, mask = default_ids(config)
            texts, source = None, "default ids"
    check_batch_size(ids)
    if ids.max() >= config.vocab_size or ids.min() < 0:
        bad = int(ids.max()) if ids.max() >= config.vocab_size else int(ids.min())
        raise VerifyError(f"token id {bad} is outside the model's vocabulary [0, {config.vocab_size})")
    if not mask[:, -1].all():
        raise VerifyError("the batch must be left-padded: every row's last position must be a real token")
    return ids, mask, source, texts
