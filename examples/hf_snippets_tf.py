"""The OPT documentation's snippet, as a Hugging Face TensorFlow user writes it, with only the import
lines changed.

    python examples/hf_snippets_tf.py

The documentation's snippets are torch-only; this is the same call sequence with Hugging Face's TF
class (`TFOPTForCausalLM`) and `return_tensors="tf"`, written as a transformers user would, except for:
  - the import lines (`opt_tf` and `opt_core` instead of `transformers`);
  - the model: the bundled model (`opt_core.bundled`, so it runs offline) instead of facebook/opt-350m.
TF has no `attn_implementation` or `torch_dtype` (torch options, which opt_tf refuses by name); the
model runs in float32. tests/common/test_hf_snippets.py compares the tokens with Hugging Face
4.57.6's TFOPTForCausalLM and with its torch class in float32.
"""

from __future__ import annotations

import sys

import tensorflow as tf

from opt_core import OPTTokenizer as GPT2Tokenizer  # was: from transformers import TFOPTForCausalLM, GPT2Tokenizer
from opt_core import bundled
from opt_tf import OPTForCausalLM as TFOPTForCausalLM

MODEL = str(bundled.path())  # was: "facebook/opt-350m"
PROMPT = (
    "A chat between a curious human and the Statue of Liberty.\n\nHuman: What is your name?\nStatue: I am the "
    "Statue of Liberty.\nHuman: Where do you live?\nStatue: New York City.\nHuman: How long have you lived "
    "there?"
)


def snippet() -> tuple[tf.Tensor, str]:
    """Greedy, 30 new tokens. Returns the ids and the decoded text."""
    # ---
    model = TFOPTForCausalLM.from_pretrained(MODEL)
    tokenizer = GPT2Tokenizer.from_pretrained(MODEL)
    prompt = PROMPT
    model_inputs = tokenizer([prompt], return_tensors="tf")
    generated_ids = model.generate(**model_inputs, max_new_tokens=30, do_sample=False)
    text = tokenizer.batch_decode(generated_ids)[0]
    # ---
    return generated_ids, text


def main() -> int:
    _, text = snippet()
    print(f"tf (float32): {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
