"""The OPT documentation's torch snippets, run with only the import lines changed.

    python examples/hf_snippets_torch.py

Hugging Face's OPT page has two: "Using Scaled Dot Product Attention (SDPA)" and "Combining OPT and
Flash Attention 2" (the same lines, with `attn_implementation="flash_attention_2"`). Each function
below is the documentation's code between its `# ---` marks, word for word, except for:
  - the import lines (`opt_torch` and `opt_core` instead of `transformers`);
  - the model: the bundled model (`opt_core.bundled`, so it runs offline) instead of facebook/opt-350m;
  - the device: the documentation's "cuda" when a GPU is there, else "cpu".

Float16 on the CPU runs (PyTorch's SDPA has float16 CPU kernels); flash attention needs a CUDA GPU
and the flash_attn package, and without them `from_pretrained` refuses with a ValueError saying
which is missing (printed here). tests/common/test_hf_snippets.py compares the tokens with Hugging
Face 4.57.6 running the original lines.
"""

from __future__ import annotations

import sys

import torch

from opt_core import OPTTokenizer as GPT2Tokenizer  # was: from transformers import OPTForCausalLM, GPT2Tokenizer
from opt_core import bundled
from opt_torch import OPTForCausalLM

MODEL = str(bundled.path())  # was: "facebook/opt-350m"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # was: device = "cuda"
PROMPT = (
    "A chat between a curious human and the Statue of Liberty.\n\nHuman: What is your name?\nStatue: I am the "
    "Statue of Liberty.\nHuman: Where do you live?\nStatue: New York City.\nHuman: How long have you lived "
    "there?"
)


def sdpa_snippet(device: str = DEVICE) -> tuple[torch.Tensor, str]:
    """The SDPA snippet: float16, attn_implementation="sdpa". Returns the ids and the decoded text."""
    # ---
    model = OPTForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float16, attn_implementation="sdpa")
    tokenizer = GPT2Tokenizer.from_pretrained(MODEL)
    prompt = PROMPT
    model_inputs = tokenizer([prompt], return_tensors="pt").to(device)
    model.to(device)
    generated_ids = model.generate(**model_inputs, max_new_tokens=30, do_sample=False)
    text = tokenizer.batch_decode(generated_ids)[0]
    # ---
    return generated_ids, text


def flash_attention_snippet(device: str = DEVICE) -> tuple[torch.Tensor, str]:
    """The flash-attention-2 snippet (needs a CUDA GPU and flash_attn: ValueError otherwise)."""
    # ---
    model = OPTForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float16, attn_implementation="flash_attention_2")
    tokenizer = GPT2Tokenizer.from_pretrained(MODEL)
    prompt = PROMPT
    model_inputs = tokenizer([prompt], return_tensors="pt").to(device)
    model.to(device)
    generated_ids = model.generate(**model_inputs, max_new_tokens=30, do_sample=False)
    text = tokenizer.batch_decode(generated_ids)[0]
    # ---
    return generated_ids, text


def main() -> int:
    _, text = sdpa_snippet()
    print(f"sdpa ({DEVICE}, float16): {text!r}")
    try:
        _, text = flash_attention_snippet()
    except ValueError as e:  # no CUDA GPU, or no flash_attn package
        print(f"flash_attention_2: refused: {e}")
    else:
        print(f"flash_attention_2 ({DEVICE}, float16): {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
