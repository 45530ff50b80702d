"""Hugging Face's answers for the standard checks, one cached oracle call per variant.

Every backend's tests compare against these, so CI pays for each oracle run once:

    g = hf_golden("post_ln_proj")
    g.folder            # HF-written checkpoint: model.safetensors, pytorch_model.bin, tf_model.h5, flax_model.msgpack
    g.ids, g.mask       # the left-padded batch
    g.torch["logits"], g.torch["hidden_states"], g.torch["greedy"], g.torch["beam"]
    g.tf["logits"], g.tf["greedy"];  g.flax["logits"], g.flax["greedy"]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.oracle import oracle_checkpoint, oracle_run
from tests.variants import VARIANTS, left_padded_batch

SEED = 0
NOISE = 1.0  # on top of HF init (std 0.02): large enough that greedy text is varied, not one token
NEW_TOKENS = 32
NUM_BEAMS = 3


@dataclass(frozen=True)
class Golden:
    folder: Path
    ids: np.ndarray
    mask: np.ndarray
    torch: dict
    tf: dict
    flax: dict


def golden_checkpoint(variant: str) -> Path:
    return oracle_checkpoint(VARIANTS[variant], seed=SEED, noise=NOISE)


@functools.cache
def hf_golden(variant: str) -> Golden:
    folder = golden_checkpoint(variant)
    ids, mask = left_padded_batch(VARIANTS[variant].vocab_size)
    greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    beam = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": NUM_BEAMS,
            "early_stopping": True, "length_penalty": 1.0}
    base = {"input_ids": ids, "attention_mask": mask}
    runs = [
        {"framework": "torch", **base, "hidden_states": True, "generate": greedy},
        {"framework": "torch", **base, "generate": beam},
        {"framework": "tf", **base, "hidden_states": True, "generate": greedy},
        {"framework": "flax", **base, "hidden_states": True, "generate": greedy},
    ]
    t_greedy, t_beam, tf, fx = oracle_run(folder, runs)
    t_greedy["greedy"] = t_greedy.pop("sequences")
    t_greedy["beam"] = t_beam["sequences"]
    tf["greedy"] = tf.pop("sequences")
    fx["greedy"] = fx.pop("sequences")
    return Golden(folder, ids, mask, t_greedy, tf, fx)
