"""Train the same tiny OPT in torch, Flax and TF (same initial weights, data, hyper-parameters,
dropout off) and plot the three loss curves: docs/loss_curves_three_backends.png.

    .venv/bin/python scripts/plot_backend_loss_curves.py [--steps 30] [--out docs/loss_curves_three_backends.png]

The setup is `opt_verify.training_curves` (what tests/training/test_backends_agree.py checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="docs/loss_curves_three_backends.png")
    args = ap.parse_args()

    from opt_verify.tolerances import TRAINING_CURVE
    from opt_verify.training_curves import CURVE_ARGS, backend_loss_curves

    names = {"torch": "PyTorch", "flax": "JAX/Flax", "tf": "TensorFlow"}
    runs = backend_loss_curves(dataclasses.replace(CURVE_ARGS, max_steps=args.steps, log_every=1000))
    curves = {names[k]: v for k, v in runs.items()}

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
    ax_diff.axhline(TRAINING_CURVE.nats, color="grey", lw=1, ls="--", label="test tolerance")
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
