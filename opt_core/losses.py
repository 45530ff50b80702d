"""What every backend's loss module shares, and a NumPy reference of the losses (float64).

`opt_torch.losses`, `opt_tf.losses` and `opt_flax.losses` hold the same three functions, in the
same order, as Hugging Face 4.57.6's OPT heads compute them: `causal_lm_loss`,
`sequence_classification_loss` (by `config.problem_type`, inferred as Hugging Face does when it is
None) and `question_answering_loss` (positions clamped to [0, T], T ignored). The model heads and
the training loops both call them, so `model(..., labels=...).loss` is what training minimises.
"""

from __future__ import annotations

import numpy as np

from opt_core.config import OPTConfig

IGNORE_INDEX = -100  # label value that no loss counts (Hugging Face's CrossEntropyLoss default)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# Hugging Face infers single-label classification only from torch.long / torch.int labels.
INTEGER_LABEL_DTYPES = ("int64", "int32")


def problem_type(config: OPTConfig, labels_dtype: str) -> str:
    """The sequence-classification loss to use: `config.problem_type`, or when that is None
    Hugging Face's rule: one label -> regression; int32/int64 labels -> single-label
    classification; anything else (float labels, other integers) -> multi-label classification.

    Args:
        config: the model config (`num_labels`, `problem_type`).
        labels_dtype: the labels' dtype name ("int64", "float32", ...).
    Raises:
        ValueError: when `config.problem_type` is not one of `PROBLEM_TYPES`.
    """
    if config.problem_type is not None:
        if config.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {config.problem_type!r} is unknown; expected one of {list(PROBLEM_TYPES)}")
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels_dtype in INTEGER_LABEL_DTYPES:
        return "single_label_classification"
    return "multi_label_classification"


def _cross_entropy(logits: np.ndarray, target: np.ndarray, ignore_index: int) -> float:
    """Mean cross-entropy of rows `logits` [N, K] at `target` [N], skipping `ignore_index`
    (NaN when every target is ignored, as torch's mean reduction)."""
    keep = target != ignore_index
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.where(keep, target, 0)[:, None], -1)[:, 0]
    with np.errstate(invalid="ignore"):
        return float(nll[keep].sum() / keep.sum())


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Reference: mean cross-entropy of labels[:, t + 1] given logits[:, t] ([B, T, V], [B, T])."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    return _cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index)


def sequence_classification_loss(logits: np.ndarray, labels: np.ndarray, config: OPTConfig) -> float:
    """Reference: MSE, cross-entropy or binary cross-entropy with logits ([B, L] logits)."""
    labels = np.asarray(labels)
    problem = problem_type(config, labels.dtype.name)
    logits = np.asarray(logits, np.float64)
    if problem == "regression":
        return float(np.mean((logits.reshape(-1) - labels.astype(np.float64).reshape(-1)) ** 2))
    if problem == "single_label_classification":
        return _cross_entropy(logits.reshape(-1, config.num_labels), labels.reshape(-1), IGNORE_INDEX)
    y = labels.astype(np.float64)
    return float(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


def question_answering_loss(
    start_logits: np.ndarray, end_logits: np.ndarray, start_positions: np.ndarray, end_positions: np.ndarray
) -> float:
    """Reference: (CE(start) + CE(end)) / 2 over [B, T] logits, positions clamped to [0, T] and T
    ignored (spans cut off by truncation do not count)."""
    t = np.shape(start_logits)[1]

    def ce(logits: np.ndarray, positions: np.ndarray) -> float:
        pos = np.clip(np.asarray(positions).reshape(-1), 0, t)
        return _cross_entropy(np.asarray(logits, np.float64), pos, t)

    return (ce(start_logits, start_positions) + ce(end_logits, end_positions)) / 2
