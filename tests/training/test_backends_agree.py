"""The same tiny model, data and hyper-parameters, dropout off, trains to the same loss curve in
torch, Flax and TF (the plot: docs/loss_curves_three_backends.png, scripts/plot_backend_loss_curves.py).

Tolerance: |loss_backend - loss_torch| <= 1e-5 nats at every one of 30 steps (losses ~4.9, so
~2e-6 relative). Measured: Flax and TF both stay within 1e-6..2e-6 of torch through 30 steps
(float32, different summation orders; the curves do not drift apart), so 1e-5 leaves ~5x headroom
for other CPUs and BLAS builds. Each of the two differences TF used to have is well above it:
Keras' epsilon placement (eps added to sqrt(v) before bias correction) gave 1e-4 within 30 steps,
and Keras squaring the un-summed tf.IndexedSlices of the embedding gradients (a wrong global norm
once clipping bites at step 3) gave 2e-4..1.2e-3. 30 steps cover warm-up, clipping and the cosine
schedule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt_core.data import TextDataset
from opt_core.training_args import TrainingArguments
from tests.training.tasks import TINY_TRAIN, affine_blocks

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]

STEPS = 30
TOLERANCE = 1e-5
ARGS = TrainingArguments(max_steps=STEPS, batch_size=8, block_size=32, learning_rate=3e-3, warmup_steps=2,
                         weight_decay=0.1, max_grad_norm=1.0, log_every=100)


def test_three_backends_trace_the_same_loss_curve(tmp_path):
    from opt_flax import OPTForCausalLM as FlaxLM
    from opt_flax.training import train_causal_lm as flax_train
    from opt_tf import OPTForCausalLM as TFLM
    from opt_tf.training import train_causal_lm as tf_train
    from opt_torch import OPTForCausalLM as TorchLM
    from opt_torch.training import train_causal_lm as torch_train

    assert TINY_TRAIN.dropout == 0.0
    data = TextDataset(affine_blocks())
    torch.manual_seed(0)
    start = TorchLM(TINY_TRAIN)
    start.save_pretrained(tmp_path)  # one initialisation, loaded by all three
    curves = {
        "torch": torch_train(start, data, ARGS, log=None).losses,
        "flax": flax_train(FlaxLM.from_pretrained(tmp_path), data, ARGS, log=None).losses,
        "tf": tf_train(TFLM.from_pretrained(tmp_path), data, ARGS, log=None).losses,
    }
    ref = np.asarray(curves["torch"])
    assert ref[-1] < ref[0] - 0.2, ref  # it is really training
    for name in ("flax", "tf"):
        diff = np.abs(np.asarray(curves[name]) - ref)
        assert diff.max() <= TOLERANCE, f"{name} vs torch: {diff.round(6).tolist()}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_tf_adamw_follows_torch_adamw(weight_decay):
    """opt_tf.training.AdamW against torch.optim.AdamW on one variable, gradients from 1e-9 (where
    epsilon placement matters) to 1, five steps with a changing learning rate."""
    import keras
    import tensorflow as tf

    from opt_tf.training import AdamW

    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 6)).astype(np.float32)
    scales = np.logspace(-9, 0, 6, dtype=np.float32)  # one column per magnitude
    grads = [(rng.normal(size=(4, 6)) * scales).astype(np.float32) for _ in range(5)]
    rates = [1e-3, 3e-3, 3e-3, 2e-3, 1e-3]

    weight = torch.nn.Parameter(torch.tensor(start))
    ref = torch.optim.AdamW([weight], lr=rates[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    variable = keras.Variable(start)
    rate = keras.Variable(rates[0])
    opt = AdamW(learning_rate=lambda: rate, beta_1=0.9, beta_2=0.95, epsilon=1e-8, weight_decay=weight_decay)
    for lr, g in zip(rates, grads):
        ref.param_groups[0]["lr"] = lr
        weight.grad = torch.tensor(g)
        ref.step()
        rate.assign(lr)
        opt.apply([tf.constant(g)], [variable])
    # A few float32 ulps of the weights (|w| <= ~3): the two do the same operations in different
    # orders. Keras' own epsilon placement misses by ~1e-4 here (the 1e-9 column), far outside.
    ulps = 4 * np.finfo(np.float32).eps * np.abs(start).max()
    np.testing.assert_allclose(np.asarray(variable), weight.detach().numpy(), rtol=0, atol=ulps)
