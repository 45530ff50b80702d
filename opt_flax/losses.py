"""The losses of the OPT heads in JAX; the heads (`opt_flax.modeling`) and the training step
(`opt_flax.training`) both call these, so they cannot disagree. Same functions, same order, in
`opt_torch.losses` and `opt_tf.losses`; the rules are Hugging Face 4.57.6's (see `opt_core.losses`,
which also holds a NumPy reference of each). Every function is jit-safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opt_core.config import OPTConfig
from opt_core.losses import IGNORE_INDEX, problem_type

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "question_answering_loss", "sequence_classification_loss"]


def _cross_entropy(logits: jax.Array, target: jax.Array, ignore_index: int, reduction: str) -> jax.Array:
    """Cross-entropy of rows `logits` [N, K] (float32) at `target` [N], skipping `ignore_index`:
    the mean over counted rows (NaN when none counts, as torch) or the sum."""
    keep = target != ignore_index
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, target, 0)[:, None], axis=-1)[:, 0]
    total = jnp.sum(nll * keep)
    return total if reduction == "sum" else total / jnp.sum(keep)


def causal_lm_loss(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> jax.Array:
    """Cross-entropy (float32) of predicting labels[:, t + 1] from logits[:, t].

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids; `ignore_index` marks targets that do not count.
        reduction: "mean" over counted targets (the head's `.loss`; NaN when none counts, as
            Hugging Face) or "sum" (validation passes, which add sums over batches).
    """
    shift_logits = logits[:, :-1].astype(jnp.float32).reshape(-1, logits.shape[-1])  # [B * (T - 1), V]
    shift_labels = jnp.asarray(labels)[:, 1:].reshape(-1)
    return _cross_entropy(shift_logits, shift_labels, ignore_index, reduction)


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, config: OPTConfig) -> jax.Array:
    """MSE (regression), cross-entropy (single label) or BCE-with-logits (multi label) of pooled
    logits [B, L], chosen by `opt_core.losses.problem_type` (`config.problem_type`, else inferred
    from `num_labels` and the labels' dtype)."""
    labels = jnp.asarray(labels)
    problem = problem_type(config, labels.dtype.name)
    logits = logits.astype(jnp.float32)
    if problem == "regression":
        return jnp.mean((logits.reshape(-1) - labels.astype(jnp.float32).reshape(-1)) ** 2)
    if problem == "single_label_classification":
        target = labels.reshape(-1).astype(jnp.int32)
        return _cross_entropy(logits.reshape(-1, config.num_labels), target, IGNORE_INDEX, "mean")
    y = labels.astype(jnp.float32)
    return jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def question_answering_loss(
    start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array, end_positions: jax.Array
) -> jax.Array:
    """(CE(start) + CE(end)) / 2 over [B, T] logits; positions are clamped to [0, T] and T is
    ignored, so answers cut off by truncation do not count (Hugging Face's `ignored_index`)."""
    ignored = start_logits.shape[1]

    def ce(logits: jax.Array, positions: jax.Array) -> jax.Array:
        pos = jnp.clip(jnp.asarray(positions).reshape(-1), 0, ignored)
        return _cross_entropy(logits.astype(jnp.float32), pos, ignored, "mean")

    return (ce(start_logits, start_positions) + ce(end_logits, end_positions)) / 2
