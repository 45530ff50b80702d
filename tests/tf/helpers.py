"""Shared helpers of the TensorFlow backend's tests."""

from __future__ import annotations

import functools

import numpy as np

from opt_core import OPTConfig
from opt_core.layout import to_layout
from opt_core.params import Head, parameter_table
from opt_core.reference import random_parameters
from tests.variants import VARIANTS

# Variants Hugging Face 4.57.6 can build (it crashes on layer_norm_elementwise_affine=False).
HF_VARIANTS = ("pre_ln", "post_ln_proj", "no_bias", "no_final_ln", "gelu")


def load_params(model, params: dict[str, np.ndarray]) -> None:
    """Assign canonical-layout arrays to a TF model (the io path without files)."""
    specs = {s.name: s for s in parameter_table(model.config, model.head)}
    for name, var in model.named_weights().items():
        var.assign(to_layout(params[name], specs[name].layout("tf")))


def random_model(cls, config: OPTConfig, seed: int = 0, std: float = 0.5):
    """`cls(config)` with opt_core's random parameters; returns (model, params)."""
    params = random_parameters(config, cls.head, seed=seed, std=std)
    model = cls(config)
    load_params(model, params)
    return model, params


@functools.cache
def golden_causal_lm(variant: str):
    """OPTForCausalLM loaded from the HF-written golden folder (one per variant per session)."""
    from opt_tf import OPTForCausalLM
    from tests.golden import hf_golden

    return OPTForCausalLM.from_pretrained(hf_golden(variant).folder)


def config(variant: str, **changes) -> OPTConfig:
    return VARIANTS[variant].replace(**changes) if changes else VARIANTS[variant]


HEADS = (Head.BASE, Head.CAUSAL_LM, Head.SEQUENCE_CLASSIFICATION, Head.QUESTION_ANSWERING)
