"""The tiny configs every backend is tested on, and the tolerances by dtype (from opt_verify.tolerances).

Each variant switches on one OPT quirk on top of a small pre-LN model, so a failure names the quirk.
"""

from __future__ import annotations

import numpy as np

from opt_core import OPTConfig
from opt_verify.tolerances import TOLERANCES

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=4,
    max_position_embeddings=64,
)

VARIANTS: dict[str, OPTConfig] = {
    "pre_ln": OPTConfig(**TINY),  # 125m-like
    "post_ln_proj": OPTConfig(**TINY, do_layer_norm_before=False, word_embed_proj_dim=16),  # 350m-like
    "pre_ln_proj": OPTConfig(**TINY, word_embed_proj_dim=16),
    "no_bias": OPTConfig(**TINY, enable_bias=False),
    "no_affine_ln": OPTConfig(**TINY, layer_norm_elementwise_affine=False),
    "no_final_ln": OPTConfig(**TINY, remove_final_layer_norm=True),
    "gelu": OPTConfig(**TINY, activation_function="gelu"),
}
# The variants every check covers at least (STYLE.md rule 9) (the rest run where they are cheap).
CORE_VARIANTS = ("pre_ln", "post_ln_proj", "no_bias", "no_affine_ln", "no_final_ln", "gelu")

# Max |a - b| over real tokens, divided by max |reference| over real tokens: the one table
# (opt_verify.tolerances, each entry with its reason), by dtype.
TOLERANCE = {dtype: tol.relative for dtype, tol in TOLERANCES.items() if dtype != "float64"}


def left_padded_batch(vocab_size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of different lengths, left-padded with id 1, each starting with </s> (2)."""
    rng = np.random.default_rng(seed)
    lengths = [9, 5, 7]
    width = max(lengths)
    ids = np.full((len(lengths), width), 1, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n] = 2
        ids[i, width - n + 1 :] = rng.integers(4, vocab_size, n - 1)
        mask[i, width - n :] = 1
    return ids, mask


def right_padded_batch(vocab_size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = left_padded_batch(vocab_size, seed)
    order = np.argsort(1 - mask, axis=1, kind="stable")  # real tokens first
    return np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)


def relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None = None) -> float:
    """max |actual - expected| / max |expected| over positions where `mask` is 1 (leading dims
    [batch, seq] of the arrays)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        actual, expected = actual[keep], expected[keep]
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(actual - expected).max() / scale)
