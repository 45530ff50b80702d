"""The one table of tolerances: `opt verify`, the test suite (tests/variants.py) and the training
agreement tests all import these numbers; each comes with the reason it is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted error, and why."""

    relative: float
    reason: str


@dataclass(frozen=True)
class LossTolerance:
    """Largest accepted absolute difference between two losses (nats), and why."""

    nats: float
    reason: str


# Activations against the float64 reference: max |a - b| / max |reference| at real tokens.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-9, "both sides float64: only the summation order differs"),
    "float32": Tolerance(
        1e-5,
        "float32 rounding through the layers is ~1e-7 relative; 1e-5 leaves room for different "
        "summation orders (oneDNN, XLA)",
    ),
    "float16": Tolerance(
        1e-2, "float16 activations keep ~11 bits; errors compound over layers and the softmax"
    ),
    "bfloat16": Tolerance(4e-2, "bfloat16 keeps 8 bits of mantissa"),
}
# quantize= models (opt_*.quantize) against the float reference: their error is reported, and only
# a gross one (a broken kernel, not rounding) fails. Greedy tokens may differ (reported, not failed).
QUANTIZED_TOLERANCES: dict[str, Tolerance] = {
    "int8": Tolerance(5e-2, "int8 weights (per-channel scales) round each weight to 1/254 of its row's range"),
    "int4": Tolerance(1e-1, "int4 weights (torch only) round each weight to 1/30 of its group's range"),
    "w8a8": Tolerance(1e-1, "int8 weights and activations: rounding of both, per call"),
}
# Two backends each within `relative` of the reference are within twice that of each other.
BACKEND_PAIR_FACTOR = 2.0
# Dtypes where every hidden state must also be within the tolerance. The float16/bfloat16 bounds are
# calibrated on logits (as the suite uses them); the residual stream before the final LayerNorm is
# not normalised, so its low-precision error runs higher and is reported there as a diagnostic only.
HIDDEN_STATES_DECIDE = ("float64", "float32")

# Losses (nats, absolute) between backends, or against the float64 NumPy reference of
# `opt_core.losses`, in float32.
LOSS = LossTolerance(
    1e-5,
    "float32 losses of O(1..5): a log-sum-exp over a few hundred classes rounds at ~1e-7; 1e-5 leaves "
    "room for different reduction orders",
)
# The same tiny model, data and hyper-parameters trained in torch, Flax and TF: |loss - loss_torch|
# at every step (tests/training/test_backends_agree.py).
TRAINING_CURVE = LossTolerance(
    1e-5,
    "measured: Flax and TF stay within 1e-6..2e-6 nats of torch through 30 steps (losses ~4.9); the "
    "two TF bugs it caught were 1e-4 (Keras' epsilon placement) and 2e-4..1.2e-3 (un-summed "
    "IndexedSlices in the gradient norm), well above it",
)
