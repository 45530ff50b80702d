"""The OPT documentation's snippet, as a Hugging Face Flax user writes it, with only the import
lines changed.

    python examples/hf_snippets_flax.py

The documentation's snippets are torch-only; this is the same call sequence with Hugging Face's
Flax class (`FlaxOPTForCausalLM`) and `return_tensors="jax"`, written as a transformers user would,
except for:
  - the import lines (`opt_flax` and `opt_core` instead of `transformers`);
  - the model: the bundled model (`opt_core.bundled`, so it runs offline) instead of facebook/opt-350m;
  - Hugging Face's Flax `generate` returns an output object whose `.sequences` are the ids;
    `opt_flax`'s returns the ids themselves (the `.sequences` line is the one difference).
Flax has no `attn_implementation` or `torch_dtype` (torch options, refused here by name); the model
runs in float32. tests/common/test_hf_snippets.py compares the tokens with Hugging Face 4.57.6
torch's in float32: its FlaxOPTForCausalLM cannot run this call (the bundled generation_config.json
sets no_repeat_ngram_size, whose Flax processor fails under current JAX).
"""

from __future__ import annotations

import sys

import numpy as np

from opt_core import OPTTokenizer as GPT2Tokenizer  # was: from transformers import FlaxOPTForCausalLM, GPT2Tokenizer
from opt_core import bundled
from opt_flax import OPTForCausalLM as FlaxOPTForCausalLM

MODEL = str(bundled.path())  # was: "facebook/opt-350m"
PROMPT = (
    "A chat between a curious human and the Statue of Liberty.\n\nHuman: What is your name?\nStatue: I am the "
    "Statue of Liberty.\nHuman: Where do you live?\nStatue: New York City.\nHuman: How long have you lived "
    "there?"
)


def snippet() -> tuple[np.ndarray, str]:
    """Greedy, 30 new tokens. Returns the ids and the decoded text."""
    # ---
    model = FlaxOPTForCausalLM.from_pretrained(MODEL)
    tokenizer = GPT2Tokenizer.from_pretrained(MODEL)
    prompt = PROMPT
    model_inputs = tokenizer([prompt], return_tensors="jax")
    generated_ids = model.generate(**model_inputs, max_new_tokens=30, do_sample=False)  # HF: (...).sequences
    text = tokenizer.batch_decode(generated_ids)[0]
    # ---
    return generated_ids, text


def main() -> int:
    _, text = snippet()
    print(f"flax (float32): {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
