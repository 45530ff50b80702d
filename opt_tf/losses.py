"""The losses of the OPT heads in TensorFlow; the heads (`opt_tf.modeling`) and training (Keras
`fit` through `opt_tf.training`) both call these, so they cannot disagree. Same functions, same
order, in `opt_torch.losses` and `opt_flax.losses`; the rules are Hugging Face 4.57.6's (see
`opt_core.losses`, which also holds a NumPy reference of each).
"""

from __future__ import annotations

import tensorflow as tf

from opt_core.config import OPTConfig
from opt_core.losses import IGNORE_INDEX, problem_type

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "question_answering_loss", "sequence_classification_loss"]


def _cross_entropy(logits: tf.Tensor, target: tf.Tensor, ignore_index: tf.Tensor | int, reduction: str) -> tf.Tensor:
    """Cross-entropy of rows `logits` [N, K] (float32) at `target` [N], skipping `ignore_index`:
    the mean over counted rows (NaN when none counts, as torch) or the sum."""
    keep = tf.not_equal(target, ignore_index)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.where(keep, target, 0), logits=logits)
    keep_f = tf.cast(keep, tf.float32)
    total = tf.reduce_sum(nll * keep_f)
    return total if reduction == "sum" else total / tf.reduce_sum(keep_f)


def causal_lm_loss(
    logits: tf.Tensor, labels: tf.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> tf.Tensor:
    """Cross-entropy (float32) of predicting labels[:, t + 1] from logits[:, t].

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids; `ignore_index` marks targets that do not count.
        reduction: "mean" over counted targets (the head's `.loss`; NaN when none counts, as
            Hugging Face) or "sum" (validation passes, which add sums over batches).
    """
    shift_logits = tf.cast(logits[:, :-1], tf.float32)  # [B, T - 1, V]
    shift_labels = tf.cast(tf.convert_to_tensor(labels)[:, 1:], tf.int32)
    return _cross_entropy(
        tf.reshape(shift_logits, [-1, tf.shape(logits)[-1]]), tf.reshape(shift_labels, [-1]), ignore_index, reduction
    )


def sequence_classification_loss(logits: tf.Tensor, labels: tf.Tensor, config: OPTConfig) -> tf.Tensor:
    """MSE (regression), cross-entropy (single label) or BCE-with-logits (multi label) of pooled
    logits [B, L], chosen by `opt_core.losses.problem_type` (`config.problem_type`, else inferred
    from `num_labels` and the labels' dtype)."""
    labels = tf.convert_to_tensor(labels)
    problem = problem_type(config, labels.dtype.name)
    logits = tf.cast(logits, tf.float32)
    if problem == "regression":
        return tf.reduce_mean(tf.square(tf.reshape(logits, [-1]) - tf.reshape(tf.cast(labels, tf.float32), [-1])))
    if problem == "single_label_classification":
        target = tf.reshape(tf.cast(labels, tf.int32), [-1])
        return _cross_entropy(tf.reshape(logits, [-1, config.num_labels]), target, IGNORE_INDEX, "mean")
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=logits))


def question_answering_loss(
    start_logits: tf.Tensor, end_logits: tf.Tensor, start_positions: tf.Tensor, end_positions: tf.Tensor
) -> tf.Tensor:
    """(CE(start) + CE(end)) / 2 over [B, T] logits; positions are clamped to [0, T] and T is
    ignored, so answers cut off by truncation do not count (Hugging Face's `ignored_index`)."""
    ignored = tf.shape(start_logits)[1]

    def ce(logits: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
        pos = tf.clip_by_value(tf.reshape(tf.cast(positions, tf.int32), [-1]), 0, ignored)
        return _cross_entropy(tf.cast(logits, tf.float32), pos, ignored, "mean")

    start_loss = ce(start_logits, tf.convert_to_tensor(start_positions))
    return (start_loss + ce(end_logits, tf.convert_to_tensor(end_positions))) / 2
