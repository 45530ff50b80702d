"""Training and fine-tuning loops for the Flax backend (optax), usable unsharded or under a mesh.

The same API as `opt_torch.training`, on `opt_core.training_args.TrainingArguments`: packed-block
causal-LM training with validation perplexity and `save_pretrained` checkpoints, and sequence-
classification / QA fine-tuning. One optimiser step = `gradient_accumulation_steps` micro-batches,
averaged inside one `nnx.jit` step; the optax chain is global-norm clipping, then AdamW with decay
on 2+-dim parameters only, the learning rate of step s being `args.learning_rate_at(s)`. The
bookkeeping (logging, evaluation schedule, checkpoints) is `opt_core.training`, shared by all three
backends. `make_optimizer` / `train_step` at the end are a minimal single-step API for scripts that
drive the steps themselves (e.g. the sharding check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opt_core.data import ArrayDataset, TextDataset
from opt_core.training import (
    Batch,
    Log,
    TrainingProgress,
    TrainResult,
    causal_lm_batches,
    evaluate_blocks,
    fine_tuning_batches,
)
from opt_core.training_args import TrainingArguments, decays
from opt_flax.losses import IGNORE_INDEX, causal_lm_loss

__all__ = [
    "TrainResult",
    "evaluate_causal_lm",
    "make_optimizer",
    "make_training_optimizer",
    "train_causal_lm",
    "train_question_answering",
    "train_sequence_classification",
    "train_step",
]

LossFn = Callable[[Any, dict[str, jax.Array]], jax.Array]


# ---------------------------------------------------------------- losses (the heads' own, opt_flax.losses)
def _causal_lm_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The head's loss with padding targets ignored (a target counts when its attention_mask is 1)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    labels = ids if mask is None else jnp.where(mask == 0, IGNORE_INDEX, ids)
    return model(ids, attention_mask=mask, labels=labels, validate=False).loss


def _classification_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The head's loss: by `config.problem_type` (inferred as Hugging Face when None)."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                 validate=False).loss


def _question_answering_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The head's loss: positions clamped to [0, T], T ignored."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 start_positions=batch["start_positions"], end_positions=batch["end_positions"],
                 validate=False).loss


# ---------------------------------------------------------------- optimiser
def make_training_optimizer(model: Any, args: TrainingArguments) -> nnx.Optimizer:
    """optax: clip by global norm (when `max_grad_norm`), then AdamW with weight decay on 2+-dim
    parameters; the learning rate of step s is `args.learning_rate_at(s)`."""
    table = jnp.asarray([args.learning_rate_at(s) for s in range(args.max_steps)], jnp.float32)

    def schedule(count: jax.Array) -> jax.Array:
        return table[jnp.minimum(count, args.max_steps - 1)]

    adamw = optax.adamw(
        schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
        weight_decay=args.weight_decay, mask=lambda params: jax.tree.map(lambda p: decays(p.shape), params),
    )
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), adamw) if args.max_grad_norm else adamw
    return nnx.Optimizer(model, tx, wrt=_trainable_filter(model))


def _trainable_filter(model: Any) -> Any:
    """What trains: only the LoRA adapters (`nnx.LoRAParam`) once `opt_flax.lora` gave the model one,
    so the base stays frozen and the optimiser state holds adapter tensors only; else every Param."""
    return nnx.LoRAParam if getattr(model, "lora_config", None) is not None else nnx.Param


# ---------------------------------------------------------------- evaluation
def evaluate_causal_lm(
    model: Any,
    data: TextDataset | np.ndarray,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Validation loss over full blocks: `{"loss", "perplexity", "tokens"}` (loss per predicted token).

    Raises:
        ValueError: when `data` holds no block.
    """

    def loss_sums(ids: np.ndarray) -> tuple[float, int]:
        loss, count = _eval_sums(model, jnp.asarray(ids))
        return float(loss), int(count)

    return evaluate_blocks(data, batch_size, max_batches, loss_sums)


# ---------------------------------------------------------------- training
def train_causal_lm(
    model: Any,
    train_data: TextDataset | np.ndarray,
    args: TrainingArguments,
    eval_data: TextDataset | np.ndarray | None = None,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Train (or fine-tune) a Flax `OPTForCausalLM` in place on packed blocks; see
    `opt_torch.training.train_causal_lm` (same arguments, same batches for the same seed).

    `args.gradient_checkpointing` switches the decoder to `nnx.remat` per layer; `args.bf16` needs a
    model built with `dtype=jnp.bfloat16` (Flax fixes the compute dtype at construction).

    Raises:
        ValueError: when the blocks are longer than the model's context, or for bf16 on a float32 model.
        FloatingPointError: when the loss stops being finite.
    """
    batches = causal_lm_batches(train_data, args, model.config.max_position_embeddings)

    def evaluate() -> dict[str, float]:
        assert eval_data is not None
        model.eval()
        try:
            return evaluate_causal_lm(model, eval_data, args.batch_size, args.eval_batches)
        finally:
            model.train()

    return _fit(model, batches, _causal_lm_loss, args, evaluate if eval_data is not None else None, tokenizer, log)


def train_sequence_classification(
    model: Any,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForSequenceClassification` on rows of `input_ids`, `attention_mask` and
    `labels` (int class ids; float for regression / multi-label): cross-entropy (or MSE / BCE)."""
    batches = fine_tuning_batches(data, args, ("input_ids", "labels"))
    return _fit(model, batches, _classification_loss, args, None, tokenizer, log)


def train_question_answering(
    model: Any,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForQuestionAnswering` on rows of `input_ids`, `attention_mask`,
    `start_positions` and `end_positions`: the mean of the start and end cross-entropies."""
    batches = fine_tuning_batches(data, args, ("input_ids", "start_positions", "end_positions"))
    return _fit(model, batches, _question_answering_loss, args, None, tokenizer, log)


def _fit(
    model: Any,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    args: TrainingArguments,
    evaluate: Callable[[], dict[str, float]] | None,
    tokenizer: Any,
    log: Log | None,
) -> TrainResult:
    if args.bf16 and jnp.dtype(getattr(model, "dtype", jnp.float32)) != jnp.bfloat16:
        raise ValueError("bf16 training in Flax needs a model built with dtype=jnp.bfloat16")
    if args.gradient_checkpointing:
        model.get_decoder().remat = True
    optimizer = make_training_optimizer(model, args)
    train_step_fn = _make_train_step(loss_fn, _trainable_filter(model))
    model.train()
    progress = TrainingProgress(model, args, evaluate, tokenizer, log)
    for step in range(args.max_steps):
        micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        stacked = {k: jnp.asarray(np.stack([m[k] for m in micro])) for k in micro[0]}  # (accum, B, ...)
        loss, norm = train_step_fn(model, optimizer, stacked)
        progress.record_step(step, float(loss), float(norm), int(stacked["input_ids"].size))
    model.eval()
    return progress.finish()


def _make_train_step(loss_fn: LossFn, wrt: Any = nnx.Param) -> Any:
    @nnx.jit
    def step(model: Any, optimizer: nnx.Optimizer,
             micro_batches: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """micro_batches: arrays [accum, B, ...]; grads averaged over the accum axis, one update."""
        accum = next(iter(micro_batches.values())).shape[0]
        total_loss, total_grads = 0.0, None
        for i in range(accum):
            batch = {k: v[i] for k, v in micro_batches.items()}
            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
            total_loss = total_loss + loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
            total_grads = grads if total_grads is None else jax.tree.map(jnp.add, total_grads, grads)
        optimizer.update(model, total_grads)
        return total_loss, optax.global_norm(total_grads)

    return step


@nnx.jit
def _eval_sums(model: Any, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(input_ids, validate=False, deterministic=True).logits
    return causal_lm_loss(logits, input_ids, reduction="sum"), jnp.asarray(input_ids[:, 1:].size)


# ---------------------------------------------------------------- single-step API
def make_optimizer(model: Any, learning_rate: float = 1e-4, weight_decay: float = 0.0) -> nnx.Optimizer:
    """Plain AdamW over the model's parameters, for `train_step` (no schedule, no clipping)."""
    return nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=weight_decay), wrt=nnx.Param)


@nnx.jit
def train_step(model: Any, optimizer: nnx.Optimizer, input_ids: jax.Array, attention_mask: jax.Array,
               labels: jax.Array) -> jax.Array:
    """One optimizer step on the causal-LM loss; returns the loss before the update.
    Dropout follows the model's mode (`model.train()` / `model.eval()`)."""

    def loss_fn(m: Any) -> jax.Array:
        return m(input_ids, attention_mask=attention_mask, labels=labels, validate=False).loss

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss
