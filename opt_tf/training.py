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
