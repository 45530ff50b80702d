"""Training and fine-tuning loops for the TF backend, written the Keras way: `model.compile(AdamW)`
then `model.fit` over a `tf.data` pipeline of the shared packed blocks.

The same API as `opt_torch.training`, on `opt_core.training_args.TrainingArguments`. One optimiser
step = `gradient_accumulation_steps` micro-batches (Keras' own accumulation); weight decay on
2+-dim variables only; the learning rate of step s is `args.learning_rate_at(s)`. `fit` runs one
"epoch" per optimiser step so the reported loss is that step's loss (`train_step` averages its loss
over an epoch); the bookkeeping after each step (logging, evaluation schedule, checkpoints) is
`opt_core.training`, shared by all three backends.

`KerasTrainingMixin` is what Keras needs to train the OPT models with a plain
`model.compile(optimizer=...)` and `model.fit(dataset)`: the models compute their own losses (`.loss`
of a call with labels), so `train_step` runs the model with `training=True` (dropout, layerdrop on)
and takes that loss; no Keras `loss=` is needed. A dataset element is a dict of model inputs
(`input_ids`, `attention_mask`, `labels`, or `start_positions`/`end_positions` for QA), or an
`(inputs, labels)` pair. For the causal LM, labels default to `input_ids` with padding (mask 0)
ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

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
from opt_tf.losses import IGNORE_INDEX, causal_lm_loss

__all__ = [
    "AdamW",
    "KerasTrainingMixin",
    "TableSchedule",
    "TrainResult",
    "evaluate_causal_lm",
    "make_training_optimizer",
    "train_causal_lm",
    "train_question_answering",
    "train_sequence_classification",
]


# ---------------------------------------------------------------- losses (the heads' own, opt_tf.losses)
def _model_inputs(model: Any, data: Any) -> dict[str, Any]:
    """Keras data -> model keyword arguments; a causal LM without labels predicts its real tokens."""
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
        # The gradient of an embedding lookup is a tf.IndexedSlices with one slice per looked-up
        # token, repeated indices not yet summed. Keras squares those slices as they are, both in
        # `global_clipnorm` (a wrong norm once clipping bites) and in Adam's second moment (wrong
        # updates for embedding rows), so the gradients are made dense (duplicates summed) first,
        # which is what torch and optax see.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in tape.gradient(loss, variables)]
        self.optimizer.apply(grads, variables)  # type: ignore[attr-defined]
        self._loss_tracker.update_state(loss)
        return {"loss": self._loss_tracker.result()}

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        out = self(**_model_inputs(self, data), training=False)  # type: ignore[operator]
        self._loss_tracker.update_state(out.loss)
        return {"loss": self._loss_tracker.result()}


# ---------------------------------------------------------------- optimiser
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


@keras.saving.register_keras_serializable(package="opt_tf")
class AdamW(keras.optimizers.AdamW):
    """Keras AdamW with the update written as torch.optim.AdamW and optax.adamw write it.

    Keras adds epsilon to sqrt(v) before bias correction, `lr * sqrt(1 - b2^t) / (1 - b1^t) * m /
    (sqrt(v) + eps)`, which is torch's formula with epsilon scaled by 1 / sqrt(1 - b2^t) (4.5x at
    the first step for b2 = 0.95). For the near-zero gradients of early training (q/k projections
    at initialisation), Adam's update is m / (|m| + eps)-like, so that changes the first update
    of such entries by up to ~30% of the learning rate. Here: `lr / (1 - b1^t) * m /
    (sqrt(v) / sqrt(1 - b2^t) + eps)`. Weight decay, clipping and accumulation are Keras' own
    (decoupled decay `w -= lr * wd * w` before the update, as torch does).
    """

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = keras.ops.cast(learning_rate, variable.dtype)
        gradient = keras.ops.cast(gradient, variable.dtype)
        step = keras.ops.cast(self.iterations + 1, variable.dtype)
        bias_correction1 = 1 - keras.ops.power(keras.ops.cast(self.beta_1, variable.dtype), step)
        bias_correction2 = 1 - keras.ops.power(keras.ops.cast(self.beta_2, variable.dtype), step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, keras.ops.multiply(keras.ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, keras.ops.multiply(keras.ops.subtract(keras.ops.square(gradient), v), 1 - self.beta_2))
        denom = keras.ops.add(keras.ops.sqrt(v) / keras.ops.sqrt(bias_correction2), self.epsilon)
        self.assign_sub(variable, keras.ops.divide(m, denom) * (lr / bias_correction1))


def make_training_optimizer(model: Any, args: TrainingArguments) -> AdamW:
    """AdamW (torch's formula) with the shared schedule, global-norm clipping and decay on 2+-dim
    variables."""
    accum = args.gradient_accumulation_steps
    optimizer = AdamW(
        learning_rate=TableSchedule([args.learning_rate_at(s) for s in range(args.max_steps)], accum),
        weight_decay=args.weight_decay, beta_1=args.adam_beta1, beta_2=args.adam_beta2,
        epsilon=args.adam_epsilon, global_clipnorm=args.max_grad_norm,
        gradient_accumulation_steps=accum if accum > 1 else None,
    )
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if not decays(tuple(v.shape))]
    )
    return optimizer


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
        logits = model(input_ids=ids, training=False).logits
        return float(causal_lm_loss(logits, ids, reduction="sum")), int(ids[:, 1:].size)

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
    """Train (or fine-tune) a TF `OPTForCausalLM` in place with `compile`/`fit` on packed blocks;
    see `opt_torch.training.train_causal_lm` (same arguments, same batches for the same seed).

    `args.bf16` sets Keras' "mixed_bfloat16" policy, which applies to models built afterwards (build
    the model after setting `keras.mixed_precision.set_global_policy`); `gradient_checkpointing` is
    not available in this backend.

    Raises:
        ValueError: when the blocks are longer than the model's context, or for gradient checkpointing.
        FloatingPointError: when the loss stops being finite.
    """
    batches = causal_lm_batches(train_data, args, model.config.max_position_embeddings)

    def evaluate() -> dict[str, float]:
        assert eval_data is not None
        return evaluate_causal_lm(model, eval_data, args.batch_size, args.eval_batches)

    return _fit(model, batches, args, evaluate if eval_data is not None else None, tokenizer, log)


def train_sequence_classification(
    model: Any,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForSequenceClassification` on rows of `input_ids`, `attention_mask` and
    `labels` (int class ids; float for regression / multi-label): the model's own loss."""
    batches = fine_tuning_batches(data, args, ("input_ids", "labels"))
    return _fit(model, batches, args, None, tokenizer, log)


def train_question_answering(
    model: Any,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForQuestionAnswering` on rows of `input_ids`, `attention_mask`,
    `start_positions` and `end_positions`: the model's own loss."""
    batches = fine_tuning_batches(data, args, ("input_ids", "start_positions", "end_positions"))
    return _fit(model, batches, args, None, tokenizer, log)


def _fit(
    model: Any,
    batches: Iterator[Batch],
    args: TrainingArguments,
    evaluate: Callable[[], dict[str, float]] | None,
    tokenizer: Any,
    log: Log | None,
) -> TrainResult:
    if args.gradient_checkpointing:
        raise ValueError("gradient checkpointing is not available in the TF backend")
    if args.bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(args.seed)  # dropout masks
    dataset, rows = _dataset(batches)
    model.compile(optimizer=make_training_optimizer(model, args))
    progress = TrainingProgress(model, args, evaluate, tokenizer, log)

    class RecordStep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            loss = float((logs or {})["loss"])
            progress.record_step(epoch, loss, None, rows * args.gradient_accumulation_steps)

    model.fit(dataset, epochs=args.max_steps, steps_per_epoch=args.gradient_accumulation_steps, verbose=0,
              callbacks=[RecordStep()])
    return progress.finish()


def _dataset(batches: Iterator[Batch]) -> tuple[tf.data.Dataset, int]:
    """A `tf.data` view of the batch stream, and the token count of one batch."""
    first = next(batches)
    spec = {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in first.items()}

    def gen() -> Iterator[Batch]:
        yield first
        yield from batches

    return tf.data.Dataset.from_generator(gen, output_signature=spec), int(np.prod(first["input_ids"].shape))
