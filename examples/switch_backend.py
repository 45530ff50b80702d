"""Switching frameworks changes the import line and nothing else.

    python examples/switch_backend.py --backend torch      # or tf, or flax

Loads the bundled model (`opt_core/bundled/opt-shakespeare`) in the chosen backend and decodes two
left-padded prompts in the five modes of the generation contract: greedy, repetition penalty, beam
search, `min_new_tokens` with an eos, and seeded sampling. It prints one line per mode: the mode's
name and the token ids as JSON. The three backends print the same lines (tests/generation/
test_switch_backend.py checks that, and compares the deterministic modes with Hugging Face 4.57.6).

The one backend-specific line is the module name in `MODULES`; every call below is the same.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

import numpy as np

from opt_core import OPTTokenizer, bundled

MODULES = {"torch": "opt_torch", "tf": "opt_tf", "flax": "opt_flax"}
PROMPTS = ["ROMEO:", "To be, or not to be"]
NEWLINE = 202  # "\n" in the bundled tokenizer: reached within a few steps, so it works as an eos
# The bundled generation_config.json samples, with penalties; every mode states what it relies on.
PLAIN = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
         "min_new_tokens": 0, "max_new_tokens": 12}
MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(PLAIN),
    "repetition_penalty": dict(PLAIN, repetition_penalty=1.5),
    "beam_search": dict(PLAIN, num_beams=3),
    "min_new_tokens_eos": dict(PLAIN, min_new_tokens=4, eos_token_id=NEWLINE),
    "seeded_sampling": dict(PLAIN, do_sample=True, temperature=0.8, top_k=40, top_p=0.95, seed=1234),
}


def prompts() -> tuple[np.ndarray, np.ndarray]:
    """The two prompts, left-padded: input_ids and attention_mask, int64 [2, T]."""
    enc = OPTTokenizer.from_pretrained(bundled.path())(PROMPTS, padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def run(backend: str) -> dict[str, list[list[int]]]:
    """Every mode's tokens [batch][prompt + generated] with `backend`'s OPTForCausalLM."""
    OPTForCausalLM = importlib.import_module(MODULES[backend]).OPTForCausalLM  # the only backend-specific line
    model = OPTForCausalLM.from_pretrained(bundled.path())
    ids, mask = prompts()
    return {name: np.asarray(model.generate(ids, attention_mask=mask, **kw)).tolist() for name, kw in MODES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(MODULES), required=True)
    args = parser.parse_args(argv)
    for name, tokens in run(args.backend).items():
        print(f"{name} {json.dumps(tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
