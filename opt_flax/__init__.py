"""JAX/Flax (NNX) backend of the OPT reference implementation (Hugging Face-compatible names and checkpoints)."""

from opt_flax.cache import StaticCache, init_cache
from opt_flax.modeling import (
    OPTAttention,
    OPTDecoder,
    OPTDecoderLayer,
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
    OPTOutput,
    OPTPreTrainedModel,
)

__all__ = [
    "OPTAttention",
    "OPTDecoder",
    "OPTDecoderLayer",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
    "OPTOutput",
    "OPTPreTrainedModel",
    "StaticCache",
    "init_cache",
]
