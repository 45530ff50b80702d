"""Shared helpers of the PyTorch backend's tests: models with the reference's random weights."""

from __future__ import annotations

import numpy as np
import torch

from opt_core import Head, OPTConfig
from opt_core.params import hf_name
from opt_core.reference import (
    ReferenceOPTForCausalLM,
    ReferenceOPTForQuestionAnswering,
    ReferenceOPTForSequenceClassification,
    ReferenceOPTModel,
    random_parameters,
)
from opt_torch.modeling import MODEL_CLASSES

REFERENCE_CLASSES = {
    Head.BASE: ReferenceOPTModel,
    Head.CAUSAL_LM: ReferenceOPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: ReferenceOPTForSequenceClassification,
    Head.QUESTION_ANSWERING: ReferenceOPTForQuestionAnswering,
}
# The output field each head is compared on.
HEAD_OUTPUT = {
    Head.BASE: "last_hidden_state",
    Head.CAUSAL_LM: "logits",
    Head.SEQUENCE_CLASSIFICATION: "logits",
    Head.QUESTION_ANSWERING: "start_logits",
}


def model_and_reference(config: OPTConfig, head: Head, attn_implementation: str = "sdpa", seed: int = 0):
    """An opt_torch model and the float64 reference holding the same random weights."""
    params = random_parameters(config, head, seed=seed)
    model = MODEL_CLASSES[head](config, attn_implementation=attn_implementation).eval()
    state = {hf_name(k, head): torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    model.load_state_dict(state, strict=True)
    return model, REFERENCE_CLASSES[head](config, params)


def compare_mask(head: Head, mask: np.ndarray) -> np.ndarray | None:
    """Rows/positions to compare: real tokens, or None for the pooled classification logits."""
    return None if head is Head.SEQUENCE_CLASSIFICATION else mask
