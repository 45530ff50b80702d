"""PyTorch backend of the OPT reference implementation (Hugging Face-compatible names and checkpoints)."""

from opt_torch.attention import ATTN_IMPLEMENTATIONS, OPTAttention
from opt_torch.cache import Cache, DynamicCache, StaticCache
from opt_torch.modeling import (
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
    "ATTN_IMPLEMENTATIONS",
    "Cache",
    "DynamicCache",
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
]

from opt_torch.generation import generate  # noqa: E402
from opt_torch.io import from_pretrained, save_pretrained  # noqa: E402

__all__ += ["from_pretrained", "generate", "save_pretrained"]
