"""What Keras needs to train the OPT models: `model.compile(optimizer=...)` then `model.fit(dataset)`.

The models compute their own losses (`.loss` of a call with labels), so `train_step` runs the model
with `training=True` (dropout, layerdrop on) and takes that loss; no Keras `loss=` is needed.

A dataset element is a dict of model inputs (`input_ids`, `attention_mask`, `labels`, or
`start_positions`/`end_positions` for QA), or an `(inputs, labels)` pair. For the causal LM, labels
default to `input_ids` with padding (mask 0) ignored.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

IGNORE_INDEX = -100


def _model_inputs(model: Any, data: Any) -> dict[str, Any]:
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    inputs = dict(x) if isinstance(x, dict) else {"input_ids": x}
    if y is not None:
        if isinstance(y, dict):
            inputs.update(y)
        else:
            inputs["labels"] = y
    head = getattr(model, "head", None)
    if getattr(head, "value", None) == "causal_lm" and "labels" not in inputs:
        ids = tf.convert_to_tensor(inputs["input_ids"])
        mask = inputs.get("attention_mask")
        labels = tf.cast(ids, tf.int32)
        if mask is not None:
            labels = tf.where(tf.cast(mask, tf.bool), labels, IGNORE_INDEX)
        inputs["labels"] = labels
    return inputs


class KerasTrainingMixin:
    """`train_step`/`test_step` for `keras.Model.fit`/`evaluate` using the model's own loss."""

    def compile(self, optimizer: Any = "adam", **kwargs: Any) -> None:  # type: ignore[override]
        """`keras.Model.compile`; the loss comes from the model (no `loss=` argument needed)."""
        if kwargs.get("loss") is not None:
            raise ValueError("OPT models compute their own loss from labels; do not pass loss= to compile()")
        kwargs.pop("loss", None)
        super().compile(optimizer=optimizer, **kwargs)  # type: ignore[misc]
        self._loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self) -> list[Any]:  # type: ignore[override]
        tracker = getattr(self, "_loss_tracker", None)
        return [tracker] if tracker is not None else []

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        inputs = _model_inputs(self, data)
        with tf.GradientTape() as tape:
            out = self(**inputs, training=True)  # type: ignore[operator]
            if out.loss is None:
                raise ValueError("the batch has no labels, so the model computed no loss")
            loss = out.loss
        variables = self.trainable_variables  # type: ignore[attr-defined]
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)  # type: ignore[attr-defined]
        self._loss_tracker.update_state(loss)
        return {"loss": self._loss_tracker.result()}

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        out = self(**_model_inputs(self, data), training=False)  # type: ignore[operator]
        self._loss_tracker.update_state(out.loss)
        return {"loss": self._loss_tracker.result()}


# =====================================================================================================
# Training loops on `opt_core.training_args.TrainingArguments` (the same API as `opt_torch.training`),
# written the Keras way: `model.compile(AdamW)` + `model.fit` over a `tf.data` pipeline of the shared
# packed blocks. One optimiser step = `gradient_accumulation_steps` micro-batches (Keras' own
# accumulation); weight decay on 2+-dim variables only; the learning rate of step s is
# `args.learning_rate_at(s)`. `fit` runs one "epoch" per optimiser step so the reported loss is that
# step's loss (the train_step above averages its loss over an epoch).
# =====================================================================================================
import json as _json  # noqa: E402
import math as _math  # noqa: E402
import time as _time  # noqa: E402
from collections.abc import Callable as _Callable  # noqa: E402
from collections.abc import Iterator as _Iterator  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402
from dataclasses import field as _field  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

import numpy as np  # noqa: E402

from opt_core.data import ArrayDataset, TextDataset  # noqa: E402
from opt_core.training_args import TrainingArguments, decays, perplexity  # noqa: E402


@_dataclass
class TrainResult:
    """What a training run did: one loss and learning rate per optimiser step, the validation passes
    (`{"step", "loss", "perplexity", "tokens"}`), wall time and tokens seen. (`grad_norms` stays
    empty: Keras clips inside the optimiser and does not report the norm.)"""

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


class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of optimiser step s = `args.learning_rate_at(s)`, looked up in a table.

    Keras passes its micro-step counter when accumulating gradients, hence the division."""

    def __init__(self, rates: list[float], accumulation: int = 1):
        self.rates = [float(r) for r in rates]
        self.accumulation = int(accumulation)
        self._table = tf.constant(self.rates, tf.float32)

    def __call__(self, step: Any) -> tf.Tensor:
        s = tf.cast(step, tf.int32) // self.accumulation
        return tf.gather(self._table, tf.minimum(s, len(self.rates) - 1))

    def get_config(self) -> dict[str, Any]:
        return {"rates": self.rates, "accumulation": self.accumulation}


def make_training_optimizer(model: Any, args: TrainingArguments) -> keras.optimizers.AdamW:
    """Keras AdamW with the shared schedule, global-norm clipping and decay on 2+-dim variables."""
    accum = args.gradient_accumulation_steps
    optimizer = keras.optimizers.AdamW(
        learning_rate=TableSchedule([args.learning_rate_at(s) for s in range(args.max_steps)], accum),
        weight_decay=args.weight_decay, beta_1=args.adam_beta1, beta_2=args.adam_beta2,
        epsilon=args.adam_epsilon, global_clipnorm=args.max_grad_norm,
        gradient_accumulation_steps=accum if accum > 1 else None,
    )
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if not decays(tuple(v.shape))]
    )
    return optimizer


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
        ids = blocks[start : start + batch_size]
        logits = tf.cast(model(input_ids=ids, training=False).logits[:, :-1], tf.float32)  # (B, T-1, V)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids[:, 1:], logits=logits)
        total += float(tf.reduce_sum(nll))
        count += int(nll.shape[0] * nll.shape[1])
    return {"loss": total / count, "perplexity": perplexity(total, count), "tokens": count}


def train_causal_lm(model: Any, train_data: TextDataset | np.ndarray, args: TrainingArguments,
                    eval_data: TextDataset | np.ndarray | None = None, tokenizer: Any = None,
                    log: _Callable[[str], None] | None = print) -> TrainResult:
    """Train (or fine-tune) a TF `OPTForCausalLM` in place with `compile`/`fit` on packed blocks;
    see `opt_torch.training.train_causal_lm` (same arguments, same batches for the same seed).

    `args.bf16` sets Keras' "mixed_bfloat16" policy, which applies to models built afterwards (build
    the model after setting `keras.mixed_precision.set_global_policy`); `gradient_checkpointing` is
    not available in this backend.
    """
    blocks = train_data if isinstance(train_data, TextDataset) else TextDataset(np.asarray(train_data))
    if blocks.block_size > model.config.max_position_embeddings:
        raise ValueError(f"blocks of {blocks.block_size} tokens are longer than the model's context "
                         f"({model.config.max_position_embeddings})")
    batches = ({"input_ids": b} for b in blocks.stream(args.batch_size, seed=args.seed))

    def evaluate() -> dict[str, float]:
        assert eval_data is not None
        return evaluate_causal_lm(model, eval_data, args.batch_size, args.eval_batches)

    return _fit(model, batches, args, evaluate if eval_data is not None else None, tokenizer, log)


def train_sequence_classification(model: Any, data: ArrayDataset | dict[str, np.ndarray],
                                  args: TrainingArguments, tokenizer: Any = None,
                                  log: _Callable[[str], None] | None = print) -> TrainResult:
    """Fine-tune an `OPTForSequenceClassification` on `input_ids`, `attention_mask`, `labels`."""
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    return _fit(model, ds.stream(args.batch_size, args.seed), args, None, tokenizer, log)


def train_question_answering(model: Any, data: ArrayDataset | dict[str, np.ndarray],
                             args: TrainingArguments, tokenizer: Any = None,
                             log: _Callable[[str], None] | None = print) -> TrainResult:
    """Fine-tune an `OPTForQuestionAnswering` on `input_ids`, `attention_mask`, `start_positions`,
    `end_positions`."""
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    return _fit(model, ds.stream(args.batch_size, args.seed), args, None, tokenizer, log)


def _fit(model: Any, batches: _Iterator[dict[str, np.ndarray]], args: TrainingArguments,
         evaluate: _Callable[[], dict[str, float]] | None, tokenizer: Any,
         log: _Callable[[str], None] | None) -> TrainResult:
    if args.gradient_checkpointing:
        raise ValueError("gradient checkpointing is not available in the TF backend")
    if args.bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(args.seed)  # dropout masks
    first = next(batches)
    spec = {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in first.items()}

    def gen() -> _Iterator[dict[str, np.ndarray]]:
        yield first
        yield from batches

    dataset = tf.data.Dataset.from_generator(gen, output_signature=spec)
    model.compile(optimizer=make_training_optimizer(model, args))
    out_dir = _Path(args.output_dir) if args.output_dir else None
    result = TrainResult()
    rows = int(np.prod(first["input_ids"].shape))
    start = _time.perf_counter()

    class _Steps(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            loss = float((logs or {})["loss"])
            if not _math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {epoch}; lower the learning rate")
            lr = args.learning_rate_at(epoch)
            result.losses.append(loss)
            result.learning_rates.append(lr)
            result.tokens += rows * args.gradient_accumulation_steps
            done = epoch + 1
            if log and (done % args.log_every == 0 or done == args.max_steps):
                elapsed = _time.perf_counter() - start
                log(f"step {done}/{args.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                    f"{result.tokens / elapsed:,.0f} tok/s  {elapsed:.0f} s")
            if evaluate and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
                ev = evaluate()
                result.evals.append({"step": done, **ev})
                if log:
                    log(f"step {done}  validation loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}  "
                        f"({ev['tokens']} tokens)")
            if out_dir and args.save_every and done % args.save_every == 0 and done != args.max_steps:
                _save(model, out_dir / f"checkpoint-{done}", tokenizer, args, result)

    model.fit(dataset, epochs=args.max_steps, steps_per_epoch=args.gradient_accumulation_steps, verbose=0,
              callbacks=[_Steps()])
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
