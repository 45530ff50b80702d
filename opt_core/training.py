"""The framework-free half of every backend's training loop: what a run records (`TrainResult`), how
the data is cut into batches, the validation pass over blocks, and the per-step bookkeeping (loss
check, logging cadence, evaluation schedule, checkpoints). `opt_torch.training`, `opt_flax.training`
and `opt_tf.training` only compute losses and apply the optimiser; everything else is here, once, so
the three loops cannot drift apart.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.data import ArrayDataset, TextDataset
from opt_core.training_args import TrainingArguments, perplexity

TRAINER_LOG_NAME = "trainer_log.json"

Batch = dict[str, np.ndarray]
Log = Callable[[str], None]


@dataclass
class TrainResult:
    """What a training run did: one loss, learning rate and gradient norm per optimiser step, the
    validation passes (`{"step", "loss", "perplexity", "tokens"}`), wall time and tokens seen.
    (`grad_norms` stays empty in the TF backend: Keras clips inside the optimiser and does not report
    the norm.)"""

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "losses": self.losses,
            "learning_rates": self.learning_rates,
            "grad_norms": self.grad_norms,
            "evals": self.evals,
            "seconds": self.seconds,
            "tokens": self.tokens,
        }


# ---------------------------------------------------------------- data
def causal_lm_batches(
    train_data: TextDataset | np.ndarray, args: TrainingArguments, context: int | None
) -> Iterator[Batch]:
    """The endless, seeded stream of `{"input_ids": [batch_size, block_size]}` batches of packed blocks.

    Raises:
        ValueError: when the blocks are longer than `context` (the model's `max_position_embeddings`).
    """
    blocks = train_data if isinstance(train_data, TextDataset) else TextDataset(np.asarray(train_data))
    if context is not None and blocks.block_size > context:
        raise ValueError(f"blocks of {blocks.block_size} tokens are longer than the model's context ({context})")
    return ({"input_ids": b} for b in blocks.stream(args.batch_size, seed=args.seed))


def fine_tuning_batches(
    data: ArrayDataset | dict[str, np.ndarray], args: TrainingArguments, required: tuple[str, ...]
) -> Iterator[Batch]:
    """The endless, seeded stream of row batches for classification / QA fine-tuning.

    Raises:
        ValueError: when a column named in `required` is missing.
    """
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    missing = [n for n in required if n not in ds.arrays]
    if missing:
        raise ValueError(f"the training data lacks {', '.join(missing)} (has {', '.join(ds.arrays)})")
    return ds.stream(args.batch_size, args.seed)


def evaluate_blocks(
    data: TextDataset | np.ndarray,
    batch_size: int,
    max_batches: int | None,
    loss_sums: Callable[[np.ndarray], tuple[float, int]],
) -> dict[str, float]:
    """Validation loss over full blocks: `{"loss", "perplexity", "tokens"}` (loss per predicted token).

    `loss_sums(ids)` returns the summed next-token cross-entropy of one [B, block_size] batch and the
    number of predicted tokens.

    Raises:
        ValueError: when `data` holds no block.
    """
    blocks = data.blocks if isinstance(data, TextDataset) else np.asarray(data)
    if len(blocks) == 0:
        raise ValueError("evaluation data holds no complete block")
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        loss, n = loss_sums(blocks[start : start + batch_size])
        total += float(loss)
        count += int(n)
    return {"loss": total / count, "perplexity": perplexity(total, count), "tokens": count}


# ---------------------------------------------------------------- per-step bookkeeping
class TrainingProgress:
    """Records each optimiser step and does what the schedule asks after it: a progress line every
    `log_every` steps, a validation pass every `eval_every` steps and at the end, a
    `checkpoint-STEP/` folder every `save_every` steps and the final save into `output_dir`.

    Args:
        model: anything with `save_pretrained(folder)`.
        args: the run's hyper-parameters.
        evaluate: runs one validation pass (None: no validation data); it must leave the model in
            training mode.
        tokenizer: saved next to every checkpoint when not None.
        log: called with each progress line; None for silence.
    """

    def __init__(
        self,
        model: Any,
        args: TrainingArguments,
        evaluate: Callable[[], dict[str, float]] | None,
        tokenizer: Any,
        log: Log | None,
    ) -> None:
        self.model, self.args, self.evaluate, self.tokenizer, self.log = model, args, evaluate, tokenizer, log
        self.out_dir = Path(args.output_dir) if args.output_dir else None
        self.result = TrainResult()
        self.start = time.perf_counter()

    def record_step(self, step: int, loss: float, grad_norm: float | None, tokens: int) -> None:
        """Book optimiser step `step` (0-based): its mean loss, gradient norm (None when the backend
        cannot tell) and the tokens it consumed; then log, evaluate and save as scheduled.

        Raises:
            FloatingPointError: when the loss is not finite.
        """
        args, result = self.args, self.result
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step}; lower the learning rate")
        lr = args.learning_rate_at(step)
        result.losses.append(loss)
        result.learning_rates.append(lr)
        if grad_norm is not None:
            result.grad_norms.append(grad_norm)
        result.tokens += tokens
        done = step + 1
        if self.log and (done % args.log_every == 0 or done == args.max_steps):
            elapsed = time.perf_counter() - self.start
            norm = f"  grad-norm {grad_norm:.3f}" if grad_norm is not None else ""
            self.log(f"step {done}/{args.max_steps}  loss {loss:.4f}  lr {lr:.2e}{norm}  "
                     f"{result.tokens / elapsed:,.0f} tok/s  {elapsed:.0f} s")
        if self.evaluate and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            ev = self.evaluate()
            result.evals.append({"step": done, **ev})
            if self.log:
                self.log(f"step {done}  validation loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}  "
                         f"({ev['tokens']} tokens)")
        if self.out_dir and args.save_every and done % args.save_every == 0 and done != args.max_steps:
            self.save(self.out_dir / f"checkpoint-{done}")

    def finish(self) -> TrainResult:
        """Stop the clock, save the final model into `output_dir` (when set) and return the result."""
        self.result.seconds = time.perf_counter() - self.start
        if self.out_dir:
            self.save(self.out_dir)
        return self.result

    def save(self, folder: Path) -> None:
        """Write the model (`save_pretrained`), the tokenizer, `training_args.json` and
        `trainer_log.json` (the result so far) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        self.args.save(folder)
        log = self.result.to_dict() | {"seconds": time.perf_counter() - self.start}
        (folder / TRAINER_LOG_NAME).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
