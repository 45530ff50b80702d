"""The same tiny model, data and hyper-parameters, dropout off, trains to the same loss curve in
torch, Flax and TF (the plot: docs/loss_curves_three_backends.png, scripts/plot_backend_loss_curves.py).

Tolerance: |loss_backend - loss_torch| <= 1e-3 nats per step over the first 8 steps (losses ~4.9,
so ~2e-4 relative). Torch and Flax agree to ~2e-6 at every step (float32, different summation
orders). TF agrees to ~1e-6 for the first 3 steps, then differs by 2e-4 to 1.2e-3 and stays there
(flat, not growing, through 30 steps: see the plot). Measured: not from Keras' epsilon placement (the
same with adam_epsilon=1e-12), weight decay (the same with 0) or XLA (the same with jit_compile off);
without clipping the difference is ~10x larger from the first update, which points at Adam's near
sign-like early updates amplifying float32 rounding in tiny gradient entries. Not pinned down
further. A real algorithmic difference (schedule, decay mask, clipping) shows up as > 1e-2 within
3 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt_core.data import TextDataset
from opt_core.training_args import TrainingArguments
from tests.training.tasks import TINY_TRAIN, affine_blocks

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]

STEPS = 8
TOLERANCE = 1e-3
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
