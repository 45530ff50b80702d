"""Subcommands of `opt`, registered with `opt_cli.main.register`."""

from __future__ import annotations

import argparse
import time

import numpy as np

from opt_cli.main import register


@register("demo", "Run the bundled model (today: the float64 reference on the opt-125m shape, random weights)")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--new-tokens", type=int, default=8)

    def run(args: argparse.Namespace) -> int:
        from opt_core import OPTConfig, OPTTokenizer
        from opt_core.reference import ReferenceOPTForCausalLM, random_parameters

        print("No bundled model yet: running the float64 NumPy reference pass on the real opt-125m")
        print("config shape with RANDOM weights. The continuation is noise; the shapes and speed are real.")
        cfg = OPTConfig.from_preset("opt-125m")
        model = ReferenceOPTForCausalLM(cfg, random_parameters(cfg, seed=0))
        tok_dir = _shared_tokenizer()
        tok = OPTTokenizer.from_pretrained(tok_dir) if tok_dir else None
        prompt = "Hello, my dog is cute"
        ids = tok([prompt])["input_ids"] if tok else np.array([[2, 31414, 6, 127, 2335, 16, 11962]])
        t0 = time.perf_counter()
        out = model.greedy(ids, max_new_tokens=args.new_tokens)
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1]:]
        print(f"prompt ids: {ids[0].tolist()}")
        print(f"greedy ids: {new.tolist()}")
        if tok:
            print(f"text: {prompt!r} -> {tok.decode(new)!r}")
        print(f"{args.new_tokens} tokens in {dt:.2f} s (float64 NumPy reference)")
        return 0

    return run


def _shared_tokenizer():
    from pathlib import Path

    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "data" / "opt-tokenizer"
        if (cand / "vocab.json").is_file():
            return cand
    return None
import opt_cli.commands_verify  # noqa: F401
import opt_cli.commands_convert  # noqa: F401
