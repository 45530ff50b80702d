"""The losses of the OPT heads in PyTorch; the heads (`opt_torch.modeling`) and the training loop
(`opt_torch.training`) both call these, so they cannot disagree. Same functions, same order, in
`opt_tf.losses` and `opt_flax.losses`; the rules are Hugging Face 4.57.6's (see `opt_core.losses`,
which also holds a NumPy reference of each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt_core.config import OPTConfig
from opt_core.losses import IGNORE_INDEX, problem_type

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "question_answering_loss", "sequence_classification_loss"]


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (float32) of predicting labels[:, t + 1] from logits[:, t].

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids; `ignore_index` marks targets that do not count.
        reduction: "mean" over counted targets (the head's `.loss`; NaN when none counts, as
            Hugging Face) or "sum" (validation passes, which add sums over batches).
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B * (T - 1), V]
    shift_labels = labels[:, 1:].reshape(-1).long()
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction=reduction)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: OPTConfig) -> torch.Tensor:
    """MSE (regression), cross-entropy (single label) or BCE-with-logits (multi label) of pooled
    logits [B, L], chosen by `opt_core.losses.problem_type` (`config.problem_type`, else inferred
    from `num_labels` and the labels' dtype)."""
    problem = problem_type(config, str(labels.dtype).removeprefix("torch."))
    logits = logits.float()
    if problem == "regression":
        return F.mse_loss(logits.reshape(-1), labels.float().reshape(-1))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, config.num_labels), labels.long().reshape(-1),
                               ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def question_answering_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2 over [B, T] logits; positions are clamped to [0, T] and T is
    ignored, so answers cut off by truncation do not count (Hugging Face's `ignored_index`)."""
    ignored = start_logits.shape[1]
    start = start_positions.reshape(-1).long().clamp(0, ignored)
    end = end_positions.reshape(-1).long().clamp(0, ignored)
    start_loss = F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
    end_loss = F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
    return (start_loss + end_loss) / 2
