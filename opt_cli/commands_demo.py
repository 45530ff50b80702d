"""`opt demo`: the bundled model in every backend on one prompt; the greedy texts must agree."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from opt_cli.backends import adapters
from opt_cli.commands_generate import encode_prompt, load_model_and_tokenizer
from opt_cli.options import (
    add_backends_argument,
    add_load_arguments,
    add_model_argument,
    add_threads_argument,
    apply_threads,
    load_options,
    positive_int,
)
from opt_cli.registry import register

DEMO_PROMPT = "ROMEO:\nWhat light"


@register("demo", "Run the bundled model in torch, tf and flax on one prompt; show that the greedy texts agree")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--prompt", default=DEMO_PROMPT, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, metavar="N", help="greedy tokens per backend")
    add_backends_argument(p)
    add_model_argument(p)
    add_threads_argument(p)
    add_load_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from opt_core import parameter_count

        backends = adapters(args.backends)
        folder, config, tokenizer = load_model_and_tokenizer(args.model)
        ids = encode_prompt(tokenizer, config, args.prompt, args.max_new_tokens)
        mask = np.ones_like(ids)
        greedy = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"model  : {folder} ({parameter_count(config):,} parameters, {config.num_hidden_layers} layers "
              f"x {config.hidden_size}, vocabulary {config.vocab_size})")
        print(f"prompt : {args.prompt!r} ({ids.shape[1]} tokens); greedy, {args.max_new_tokens} new tokens\n")
        results: dict[str, np.ndarray] = {}
        models = {}
        failed: list[str] = []
        for backend in backends:
            try:
                t0 = time.perf_counter()
                backend.module()
                apply_threads(backend, args.threads)
                model = backend.load(folder, **load_options(args))
                t_load = time.perf_counter() - t0
                t0 = time.perf_counter()  # first call: includes tracing / XLA compilation
                backend.generate(model, ids, mask, **greedy)
                t_first = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = backend.generate(model, ids, mask, **greedy)
                dt = time.perf_counter() - t0
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a broken or missing backend must not hide the others
                print(f"[{backend.name}] FAILED: {type(e).__name__}: {e}\n")
                failed.append(backend.name)
                continue
            new = out[0, ids.shape[1] :]
            results[backend.name] = new
            models[backend.name] = (backend, model)
            print(f"[{backend.name}] {len(new) / dt:8.1f} tokens/s on the second call, excluding compilation "
                  f"(load {t_load:.1f} s, first call {t_first:.1f} s incl. compilation)")
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
        # greedy text of a tiny model is dull; show what sampling writes (first backend that ran)
        name, (backend, model) = next(iter(models.items()))
        sample = backend.generate(model, ids, mask, max_new_tokens=args.max_new_tokens, do_sample=True,
                                  temperature=0.8, top_k=40, seed=1)
        text = tokenizer.decode(sample[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"\nsampled ({name}, top-k 40, temperature 0.8, seed 1):")
        print("    " + (args.prompt + text).replace("\n", "\n    "))
        if failed:
            print(f"backends that failed: {', '.join(failed)}")
        return 0 if same and not failed else 1

    return run
