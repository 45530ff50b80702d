"""Train the same tiny OPT in torch, Flax and TF (same initial weights, data and hyper-parameters,
dropout off) and return the three loss curves: what tests/training/test_backends_agree.py holds to
`opt_verify.tolerances.TRAINING_CURVE` and scripts/plot_backend_loss_curves.py draws.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from opt_core import OPTConfig
from opt_core.data import TextDataset
from opt_core.training_args import TrainingArguments

TINY_TRAIN = OPTConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
    max_position_embeddings=64, dropout=0.0,
)
# 30 steps cover warm-up, gradient clipping (it bites at step 3) and the cosine schedule.
CURVE_ARGS = TrainingArguments(max_steps=30, batch_size=8, block_size=32, learning_rate=3e-3, warmup_steps=2,
                               weight_decay=0.1, max_grad_norm=1.0, log_every=100)
CURVE_BACKENDS = ("torch", "flax", "tf")


def affine_blocks(n: int = 64, length: int = 32, seed: int = 0) -> np.ndarray:
    """[n, length] blocks `</s> a f(a) f(f(a)) ...` with f(x) = 3x mod 124 + 4: learnable in a few
    steps, so a falling loss is a real signal."""
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, length), dtype=np.int64)
    blocks[:, 0] = 2
    blocks[:, 1] = rng.integers(4, 128, n)
    for j in range(2, length):
        blocks[:, j] = (blocks[:, j - 1] * 3) % 124 + 4
    return blocks


def backend_loss_curves(
    args: TrainingArguments = CURVE_ARGS, config: OPTConfig = TINY_TRAIN, folder: str | Path | None = None
) -> dict[str, list[float]]:
    """{"torch", "flax", "tf"} -> the per-step training losses of `train_causal_lm` from one torch
    initialisation (seed 0, saved to `folder` or a temporary folder and loaded by the other two)."""
    import torch

    from opt_flax import OPTForCausalLM as FlaxLM
    from opt_flax.training import train_causal_lm as flax_train
    from opt_tf import OPTForCausalLM as TFLM
    from opt_tf.training import train_causal_lm as tf_train
    from opt_torch import OPTForCausalLM as TorchLM
    from opt_torch.training import train_causal_lm as torch_train

    data = TextDataset(affine_blocks())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(folder) if folder is not None else Path(tmp)
        torch.manual_seed(0)
        start = TorchLM(config)
        start.save_pretrained(folder)
        return {
            "torch": torch_train(start, data, args, log=None).losses,
            "flax": flax_train(FlaxLM.from_pretrained(folder), data, args, log=None).losses,
            "tf": tf_train(TFLM.from_pretrained(folder), data, args, log=None).losses,
        }
