"""Train the same tiny OPT in torch, Flax and TF (same initial weights, data, hyper-parameters,
dropout off) and plot the three loss curves: docs/loss_curves_three_backends.png.

    .venv/bin/python scripts/plot_backend_loss_curves.py [--steps 30] [--out docs/loss_curves_three_backends.png]

The test `tests/training/test_backends_agree.py` checks the first 8 steps of the same setup.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def affine_blocks(n: int = 64, length: int = 32, seed: int = 0) -> np.ndarray:
    """Same synthetic blocks as tests/training/tasks.py: `</s> a f(a) f(f(a)) ...`."""
    rng = np.random.default_rng(seed)
    blocks = np.empty((n, length), dtype=np.int64)
    blocks[:, 0] = 2
    blocks[:, 1] = rng.integers(4, 128, n)
    for j in range(2, length):
        blocks[:, j] = (blocks[:, j - 1] * 3) % 124 + 4
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="docs/loss_curves_three_backends.png")
    args = ap.parse_args()

    import torch

    from opt_core import OPTConfig
    from opt_core.data import TextDataset
    from opt_core.training_args import TrainingArguments
    from opt_flax import OPTForCausalLM as FlaxLM
    from opt_flax.training import train_causal_lm as flax_train
    from opt_tf import OPTForCausalLM as TFLM
    from opt_tf.training import train_causal_lm as tf_train
    from opt_torch import OPTForCausalLM as TorchLM
    from opt_torch.training import train_causal_lm as torch_train

    config = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=64, dropout=0.0)
    targs = TrainingArguments(max_steps=args.steps, batch_size=8, block_size=32, learning_rate=3e-3,
                              warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0, log_every=1000)
    data = TextDataset(affine_blocks())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = TorchLM(config)
        model.save_pretrained(tmp)
        curves = {
            "PyTorch": torch_train(model, data, targs, log=None).losses,
            "JAX/Flax": flax_train(FlaxLM.from_pretrained(tmp), data, targs, log=None).losses,
            "TensorFlow": tf_train(TFLM.from_pretrained(tmp), data, targs, log=None).losses,
        }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, args.steps + 1)
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for (name, losses), style in zip(curves.items(), ("-", "--", ":")):
        ax.plot(steps, losses, style, lw=2, label=name)
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Same tiny OPT, data and hyper-parameters, dropout off")
    ax.legend()
    ref = np.asarray(curves["PyTorch"])
    for name in ("JAX/Flax", "TensorFlow"):
        ax_diff.semilogy(steps, np.maximum(np.abs(np.asarray(curves[name]) - ref), 1e-9), label=f"|{name} - PyTorch|")
    ax_diff.axhline(1e-3, color="grey", lw=1, ls="--", label="test tolerance (first 8 steps)")
    ax_diff.set_xlabel("optimiser step")
    ax_diff.set_ylabel("|difference|")
    ax_diff.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    for name, losses in curves.items():
        print(f"{name:10s} first {losses[0]:.5f}  last {losses[-1]:.5f}  max |diff vs torch| "
              f"{np.abs(np.asarray(losses) - ref).max():.2e}")


if __name__ == "__main__":
    main()
