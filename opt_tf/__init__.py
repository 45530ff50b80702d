"""TensorFlow (Keras 3) backend of the OPT reference implementation (Hugging Face-compatible names
and checkpoints). Needs KERAS_BACKEND=tensorflow (the default)."""

from opt_tf.cache import StaticCache, init_cache
from opt_tf.export import export_saved_model
from opt_tf.generation import generate
from opt_tf.modeling import (
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
    "export_saved_model",
    "generate",
    "init_cache",
]
