"""The same tiny model, data and hyper-parameters, dropout off, trains to the same loss curve in
torch, Flax and TF (the plot: docs/loss_curves_three_backends.png, scripts/plot_backend_loss_curves.py).

The setup (config, data, 30 steps of warm-up, clipping and cosine schedule) is
`opt_verify.training_curves`; the tolerance, |loss_backend - loss_torch| at every step, is
`opt_verify.tolerances.TRAINING_CURVE` (1e-5 nats, losses ~4.9), where its measurement and the two TF
bugs it caught are written down.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt_verify.tolerances import TRAINING_CURVE
from opt_verify.training_curves import CURVE_ARGS, TINY_TRAIN, backend_loss_curves

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]


def test_three_backends_trace_the_same_loss_curve(tmp_path):
    assert TINY_TRAIN.dropout == 0.0 and CURVE_ARGS.max_steps == 30
    curves = backend_loss_curves(folder=tmp_path)  # one initialisation, loaded by all three
    ref = np.asarray(curves["torch"])
    assert ref[-1] < ref[0] - 0.2, ref  # it is really training
    for name in ("flax", "tf"):
        diff = np.abs(np.asarray(curves[name]) - ref)
        assert diff.max() <= TRAINING_CURVE.nats, f"{name} vs torch: {diff.round(6).tolist()}"


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
