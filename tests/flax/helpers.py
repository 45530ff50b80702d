"""Shared pieces of the Flax tests: models loaded once per process (JAX compiles are the cost)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from opt_core.checkpoint import save_numpy_safetensors
from opt_core.params import Head, hf_name
from opt_core.reference import (
    ReferenceOPTForCausalLM,
    ReferenceOPTForQuestionAnswering,
    ReferenceOPTForSequenceClassification,
    ReferenceOPTModel,
    random_parameters,
)
from tests.golden import golden_checkpoint
from tests.variants import VARIANTS

REFERENCE = {
    Head.BASE: ReferenceOPTModel,
    Head.CAUSAL_LM: ReferenceOPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: ReferenceOPTForSequenceClassification,
    Head.QUESTION_ANSWERING: ReferenceOPTForQuestionAnswering,
}


def write_random_checkpoint(folder: Path, variant: str, head: Head, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights (opt_core.reference.random_parameters, std 0.5 so logits are not flat) for
    `head` written as an HF safetensors folder; returns the canonical tensors."""
    config = VARIANTS[variant]
    params = random_parameters(config, head, seed=seed, std=0.5)
    config.save_pretrained(folder)
    stored = {k: v for k, v in params.items() if k != "lm_head.weight"}
    save_numpy_safetensors(folder, {hf_name(k, head): v for k, v in stored.items()})
    return params


@functools.cache
def golden_model(variant: str, fmt: str = "safetensors"):
    from opt_flax import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(golden_checkpoint(variant), format=fmt)
