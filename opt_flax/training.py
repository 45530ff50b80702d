"""Training steps for the Flax models (optax), usable unsharded or under a mesh.

A minimal counterpart of `opt_torch.training`: an AdamW optimizer and a jitted causal-LM step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx


def make_optimizer(model: Any, learning_rate: float = 1e-4, weight_decay: float = 0.0) -> nnx.Optimizer:
    """AdamW over the model's parameters."""
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


# =====================================================================================================
# Training loops on `opt_core.training_args.TrainingArguments` (the same API as `opt_torch.training`):
# packed-block causal-LM training with evaluation perplexity and `save_pretrained` checkpoints, and
# sequence-classification / QA fine-tuning. One optimiser step = `gradient_accumulation_steps`
# micro-batches, averaged inside one `nnx.jit` step; optax chain: global-norm clipping, then AdamW with
# decay on 2+-dim parameters only, learning rate from the shared schedule table.
# =====================================================================================================
import json as _json  # noqa: E402
import math as _math  # noqa: E402
import time as _time  # noqa: E402
from collections.abc import Callable as _Callable  # noqa: E402
from collections.abc import Iterator as _Iterator  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402
from dataclasses import field as _field  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from opt_core.data import ArrayDataset, TextDataset  # noqa: E402
from opt_core.training_args import TrainingArguments, decays, perplexity  # noqa: E402


@_dataclass
class TrainResult:
    """What a training run did: one loss, learning rate and gradient norm per optimiser step, the
    validation passes (`{"step", "loss", "perplexity", "tokens"}`), wall time and tokens seen."""

    losses: list[float] = _field(default_factory=list)
    learning_rates: list[float] = _field(default_factory=list)
    grad_norms: list[float] = _field(default_factory=list)
    evals: list[dict[str, float]] = _field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "losses": self.losses, "learning_rates": self.learning_rates,
                "grad_norms": self.grad_norms, "evals": self.evals, "seconds": self.seconds,
                "tokens": self.tokens}


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array,
                   attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (float32) and the number of predicted tokens."""
    shift = logits[:, :-1].astype(jnp.float32)  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    if attention_mask is None:
        weight = jnp.ones(targets.shape, jnp.float32)
    else:
        weight = attention_mask[:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(shift, targets)
    return jnp.sum(nll * weight), jnp.sum(weight)


def _causal_lm_loss_fn(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    mask = batch.get("attention_mask")
    logits = model(batch["input_ids"], attention_mask=mask, validate=False).logits
    total, count = causal_lm_loss(logits, batch["input_ids"], mask)
    return total / jnp.maximum(count, 1.0)


def _classification_loss_fn(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), validate=False).logits
    logits = logits.astype(jnp.float32)
    labels = batch["labels"]
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if logits.shape[-1] == 1:
            return jnp.mean((logits[:, 0] - labels) ** 2)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _question_answering_loss_fn(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), validate=False)
    start = optax.softmax_cross_entropy_with_integer_labels(out.start_logits.astype(jnp.float32),
                                                            batch["start_positions"])
    end = optax.softmax_cross_entropy_with_integer_labels(out.end_logits.astype(jnp.float32),
                                                          batch["end_positions"])
    return (jnp.mean(start) + jnp.mean(end)) / 2


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
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _make_step(loss_fn: _Callable[[Any, dict[str, jax.Array]], jax.Array]) -> Any:
    @nnx.jit
    def step(model: Any, optimizer: nnx.Optimizer,
             micro_batches: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """micro_batches: arrays [accum, B, ...]; grads averaged over the accum axis, one update."""
        accum = next(iter(micro_batches.values())).shape[0]
        total_loss, total_grads = 0.0, None
        for i in range(accum):
            batch = {k: v[i] for k, v in micro_batches.items()}
            loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
            total_loss = total_loss + loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
            total_grads = grads if total_grads is None else jax.tree.map(jnp.add, total_grads, grads)
        optimizer.update(model, total_grads)
        return total_loss, optax.global_norm(total_grads)

    return step


@nnx.jit
def _eval_sums(model: Any, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(input_ids, validate=False, deterministic=True).logits
    return causal_lm_loss(logits, input_ids)


def evaluate_causal_lm(model: Any, data: TextDataset | np.ndarray, batch_size: int = 16,
                       max_batches: int | None = None) -> dict[str, float]:
    """Validation loss over full blocks: `{"loss", "perplexity", "tokens"}` (loss per predicted token)."""
    blocks = data.blocks if isinstance(data, TextDataset) else np.asarray(data)
    if len(blocks) == 0:
        raise ValueError("evaluation data holds no complete block")
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        loss, n = _eval_sums(model, jnp.asarray(blocks[start : start + batch_size]))
        total += float(loss)
        count += int(n)
    return {"loss": total / count, "perplexity": perplexity(total, count), "tokens": count}


def train_causal_lm(model: Any, train_data: TextDataset | np.ndarray, args: TrainingArguments,
                    eval_data: TextDataset | np.ndarray | None = None, tokenizer: Any = None,
                    log: _Callable[[str], None] | None = print) -> TrainResult:
    """Train (or fine-tune) a Flax `OPTForCausalLM` in place on packed blocks; see
    `opt_torch.training.train_causal_lm` (same arguments, same batches for the same seed).

    `args.gradient_checkpointing` switches the decoder to `nnx.remat` per layer; `args.bf16` needs a
    model built with `dtype=jnp.bfloat16` (Flax fixes the compute dtype at construction).
    """
    blocks = train_data if isinstance(train_data, TextDataset) else TextDataset(np.asarray(train_data))
    if blocks.block_size > model.config.max_position_embeddings:
        raise ValueError(f"blocks of {blocks.block_size} tokens are longer than the model's context "
                         f"({model.config.max_position_embeddings})")
    batches = ({"input_ids": b} for b in blocks.stream(args.batch_size, seed=args.seed))

    def evaluate() -> dict[str, float]:
        assert eval_data is not None
        return evaluate_causal_lm(model, eval_data, args.batch_size, args.eval_batches)

    return _fit(model, batches, _causal_lm_loss_fn, args, evaluate if eval_data is not None else None,
                tokenizer, log)


def train_sequence_classification(model: Any, data: ArrayDataset | dict[str, np.ndarray],
                                  args: TrainingArguments, tokenizer: Any = None,
                                  log: _Callable[[str], None] | None = print) -> TrainResult:
    """Fine-tune an `OPTForSequenceClassification` on `input_ids`, `attention_mask`, `labels`."""
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    return _fit(model, ds.stream(args.batch_size, args.seed), _classification_loss_fn, args, None,
                tokenizer, log)


def train_question_answering(model: Any, data: ArrayDataset | dict[str, np.ndarray],
                             args: TrainingArguments, tokenizer: Any = None,
                             log: _Callable[[str], None] | None = print) -> TrainResult:
    """Fine-tune an `OPTForQuestionAnswering` on `input_ids`, `attention_mask`, `start_positions`,
    `end_positions` (mean of the start and end cross-entropies)."""
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    return _fit(model, ds.stream(args.batch_size, args.seed), _question_answering_loss_fn, args, None,
                tokenizer, log)


def _fit(model: Any, batches: _Iterator[dict[str, np.ndarray]], loss_fn: Any, args: TrainingArguments,
         evaluate: _Callable[[], dict[str, float]] | None, tokenizer: Any,
         log: _Callable[[str], None] | None) -> TrainResult:
    if args.bf16 and jnp.dtype(getattr(model, "dtype", jnp.float32)) != jnp.bfloat16:
        raise ValueError("bf16 training in Flax needs a model built with dtype=jnp.bfloat16")
    if args.gradient_checkpointing:
        model.get_decoder().remat = True
    optimizer = make_training_optimizer(model, args)
    step_fn = _make_step(loss_fn)
    out_dir = _Path(args.output_dir) if args.output_dir else None
    result = TrainResult()
    model.train()
    start = _time.perf_counter()
    for step in range(args.max_steps):
        micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        stacked = {k: jnp.asarray(np.stack([m[k] for m in micro])) for k in micro[0]}  # (accum, B, ...)
        loss, norm = step_fn(model, optimizer, stacked)
        loss, norm = float(loss), float(norm)
        if not _math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step}; lower the learning rate")
        lr = args.learning_rate_at(step)
        result.losses.append(loss)
        result.learning_rates.append(lr)
        result.grad_norms.append(norm)
        result.tokens += int(stacked["input_ids"].size)
        done = step + 1
        if log and (done % args.log_every == 0 or done == args.max_steps):
            elapsed = _time.perf_counter() - start
            log(f"step {done}/{args.max_steps}  loss {loss:.4f}  lr {lr:.2e}  grad-norm {norm:.3f}  "
                f"{result.tokens / elapsed:,.0f} tok/s  {elapsed:.0f} s")
        if evaluate and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            model.eval()
            ev = evaluate()
            model.train()
            result.evals.append({"step": done, **ev})
            if log:
                log(f"step {done}  validation loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}  "
                    f"({ev['tokens']} tokens)")
        if out_dir and args.save_every and done % args.save_every == 0 and done != args.max_steps:
            _save(model, out_dir / f"checkpoint-{done}", tokenizer, args, result)
    model.eval()
    result.seconds = _time.perf_counter() - start
    if out_dir:
        _save(model, out_dir, tokenizer, args, result)
    return result


def _save(model: Any, folder: _Path, tokenizer: Any, args: TrainingArguments, result: TrainResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    args.save(folder)
    (folder / "trainer_log.json").write_text(_json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
