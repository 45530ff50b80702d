"""`TrainingArguments`: the hyper-parameters every backend's training loop reads, and the parts of
the optimisation that must be identical across backends (learning-rate schedule, which parameters
decay), written once here so the three loss curves can agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
TRAINING_ARGS_NAME = "training_args.json"


@dataclass(frozen=True)
class TrainingArguments:
    """Hyper-parameters of a training run (shared by `opt_torch`, `opt_tf` and `opt_flax`).

    The optimiser is AdamW with decoupled weight decay on every parameter of two or more
    dimensions (matrices and embeddings; not biases or LayerNorm), the learning rate warms up
    linearly for `warmup_steps` then follows `lr_schedule` down to `min_lr_ratio * learning_rate`
    at `max_steps`. One step is `gradient_accumulation_steps` micro-batches of `batch_size` rows.

    Raises:
        ValueError: on construction, for a value out of range.
    """

    max_steps: int = 1000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    block_size: int = 256
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 0
    validation_fraction: float = 0.1
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int | None = None  # validation batches per pass; None = the whole split
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    output_dir: str | None = None
    bf16: bool = False  # torch: autocast to bfloat16; flax/tf: bfloat16 compute where supported
    gradient_checkpointing: bool = False  # torch: checkpoint each layer; flax: nnx.remat

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "block_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingArguments.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainingArguments.{name} must be an integer >= 0, got {value!r}")
        if self.block_size < 2:
            raise ValueError(f"TrainingArguments.block_size must be at least 2, got {self.block_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainingArguments.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainingArguments.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(
                f"TrainingArguments.lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"TrainingArguments.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainingArguments.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"TrainingArguments.adam_epsilon must be positive, got {self.adam_epsilon}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"TrainingArguments.max_grad_norm must be positive or None, got {self.max_grad_norm}"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"TrainingArguments.validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(
                f"TrainingArguments.eval_batches must be positive or None, got {self.eval_batches}"
            )

    # ------------------------------------------------------------ schedule
    def learning_rate_at(self, step: int) -> float:
        """The learning rate used by optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.learning_rate
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.learning_rate * self.min_lr_ratio
        if self.lr_schedule == "linear":
            return floor + (self.learning_rate - floor) * (1.0 - progress)
        return floor + (self.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.block_size

    # ------------------------------------------------------------ dict / file
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingArguments:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainingArguments fields: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainingArguments:
        return dataclasses.replace(self, **changes)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write `folder/training_args.json`."""
        path = Path(folder) / TRAINING_ARGS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def decays(shape: tuple[int, ...]) -> bool:
    """True for parameters that get weight decay: matrices and embeddings (2 or more dims)."""
    return len(shape) >= 2


def perplexity(total_loss: float, total_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token), inf when it overflows."""
    if total_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    mean = total_loss / total_tokens
    return math.exp(mean) if mean < 700 else math.inf
