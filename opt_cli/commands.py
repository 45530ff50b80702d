"""Subcommands of `opt`, registered with `opt_cli.main.register`.

`opt demo` lives here; the other commands live in `opt_cli/commands_*.py`, imported at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from opt_cli.main import register

DEMO_PROMPT = "ROMEO:\nWhat light"


@register("demo", "Run the bundled model in torch, tf and flax on one prompt; show that the greedy texts agree")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"text to continue (default {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--backends", default="torch,tf,flax", help="comma-separated (default torch,tf,flax)")
    p.add_argument("--model", default="bundled", help="model folder (default: the bundled model)")

    def run(args: argparse.Namespace) -> int:
        from opt_cli.backends import check_backend, generate, load_causal_lm, load_tokenizer, resolve_model_dir
        from opt_cli.commands_generate import encode_prompt
        from opt_core import OPTConfig, parameter_count

        backends = [check_backend(b.strip()) for b in args.backends.split(",") if b.strip()]
        folder = resolve_model_dir(args.model)
        config = OPTConfig.from_pretrained(folder)
        tokenizer = load_tokenizer(folder)
        ids = encode_prompt(tokenizer, config, args.prompt, args.max_new_tokens)
        mask = np.ones_like(ids)
        print(f"model  : {folder} ({parameter_count(config):,} parameters, {config.num_hidden_layers} layers "
              f"x {config.hidden_size}, vocabulary {config.vocab_size})")
        print(f"prompt : {args.prompt!r} ({ids.shape[1]} tokens); greedy, {args.max_new_tokens} new tokens\n")
        results: dict[str, np.ndarray] = {}
        failed: list[str] = []
        for backend in backends:
            try:
                t0 = time.perf_counter()
                model = load_causal_lm(backend, folder)
                t_load = time.perf_counter() - t0
                t0 = time.perf_counter()  # first call: includes tracing / XLA compilation
                generate(backend, model, ids, mask, max_new_tokens=args.max_new_tokens)
                t_first = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = generate(backend, model, ids, mask, max_new_tokens=args.max_new_tokens)
                dt = time.perf_counter() - t0
            except Exception as e:  # a broken or missing backend must not hide the others
                print(f"[{backend}] FAILED: {type(e).__name__}: {e}\n")
                failed.append(backend)
                continue
            new = out[0, ids.shape[1] :]
            results[backend] = new
            n = len(new)
            print(f"[{backend}] {n / dt:8.1f} tokens/s   (load {t_load:.1f} s, first call {t_first:.1f} s "
                  f"incl. compilation)")
            # repr keeps line breaks visible: a small model's greedy text is often mostly "\n"
            print(f"    {args.prompt!r} + {tokenizer.decode(new, skip_special_tokens=True)!r}")
        if not results:
            print("no backend ran", file=sys.stderr)
            return 1
        first = next(iter(results.values()))
        same = all(len(v) == len(first) and (v == first).all() for v in results.values())
        names = ", ".join(results)
        if same:
            print(f"greedy texts agree: identical {len(first)} token ids in {len(results)} backends ({names})")
        else:
            print(f"greedy texts DIFFER between backends ({names}):")
            for b, v in results.items():
                print(f"  {b:5s} {v.tolist()}")
        if "torch" in results:  # greedy text of a tiny model is dull; show what sampling writes
            sample = generate("torch", load_causal_lm("torch", folder), ids, mask, max_new_tokens=args.max_new_tokens,
                              do_sample=True, temperature=0.8, top_k=40, seed=1)
            text = tokenizer.decode(sample[0, ids.shape[1] :], skip_special_tokens=True)
            print("\nsampled (torch, top-k 40, temperature 0.8, seed 1; sampling is not compared across backends):")
            print("    " + (args.prompt + text).replace("\n", "\n    "))
        if failed:
            print(f"backends that failed: {', '.join(failed)}")
        return 0 if same and not failed else 1

    return run
