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
