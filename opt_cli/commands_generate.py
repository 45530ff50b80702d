"""`opt generate`: continue a prompt with any OPT folder (or the bundled model) in any backend.

    opt generate --prompt "ROMEO:"                                   # bundled model, torch
    opt generate --model DIR --backend flax --prompt "Hello" --do-sample --top-p 0.9 --seed 1
    opt generate --prompt "KING:" --stream                           # text printed as it is produced

The tokens/s figure never includes compilation: with --stream it counts from the first new token to
the last as the streamer sees them arrive; otherwise a backend that compiles (TensorFlow, JAX) is
timed on a second call, and eager torch on its only call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from opt_cli.backends import adapter
from opt_cli.errors import UsageError
from opt_cli.options import (
    add_backend_argument,
    add_load_arguments,
    add_model_argument,
    add_sampling_arguments,
    add_threads_argument,
    apply_threads,
    generation_kwargs,
    load_options,
    print_on_first_rank_only,
    require_distributed_launch,
)
from opt_cli.paths import model_folder, tokenizer_folder
from opt_cli.registry import register
from opt_cli.streaming import TextStreamer


def encode_prompts(tokenizer: Any, config: Any, prompts: list[str],
                   max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) [B, T] of the prompts (`</s>` first), padded on the LEFT as a
    decoder-only model needs (a new token must follow each row's last real token), or a UsageError
    when a prompt is empty or too long."""
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise UsageError("the prompt is empty; pass some text with --prompt")
    enc = tokenizer(prompts, padding=True, padding_side="left")
    ids, mask = np.asarray(enc["input_ids"], dtype=np.int64), np.asarray(enc["attention_mask"], dtype=np.int64)
    limit = config.max_position_embeddings
    if ids.shape[1] >= limit:
        raise UsageError(
            f"the prompt is {ids.shape[1]} tokens long, but the model's context is {limit} tokens; "
            "shorten it"
        )
    if ids.shape[1] + max_new_tokens > limit:
        raise UsageError(
            f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {limit} tokens; ask for at most {limit - ids.shape[1]} new tokens"
        )
    if int(ids.max()) >= config.vocab_size:
        raise UsageError(
            f"the tokenizer produced id {int(ids.max())}, outside the model's vocabulary ({config.vocab_size}); "
            "the tokenizer files do not belong to this model"
        )
    return ids, mask


def encode_prompt(tokenizer: Any, config: Any, prompt: str, max_new_tokens: int) -> np.ndarray:
    """[1, T] ids of one prompt (`</s>` first), or a UsageError when it is empty or too long."""
    return encode_prompts(tokenizer, config, [prompt], max_new_tokens)[0]


def load_model_and_tokenizer(model_arg: str) -> tuple[Any, Any, Any]:
    """(folder, config, tokenizer) of a `--model` argument."""
    from opt_core import OPTConfig, OPTTokenizer

    folder = model_folder(model_arg)
    config = OPTConfig.from_pretrained(folder)
    tokenizer = OPTTokenizer.from_pretrained(tokenizer_folder(folder, what="--model"))
    return folder, config, tokenizer


def generate_streaming(backend: Any, model: Any, ids: np.ndarray, streamer: TextStreamer,
                       mask: np.ndarray | None = None, **kwargs: Any) -> tuple[np.ndarray, bool]:
    """Generate through the contract's `streamer=`; (tokens, streamed). A backend whose `generate`
    does not take a streamer yet runs without one (streamed False)."""
    mask = np.ones_like(ids) if mask is None else mask
    try:
        out = backend.generate(model, ids, mask, streamer=streamer, **kwargs)
    except TypeError as e:
        if "streamer" not in str(e):
            raise
        return backend.generate(model, ids, mask, **kwargs), False
    streamer.end()
    return out, streamer.streamed


@register("generate", "Continue a prompt with an OPT model folder (or the bundled model)")
def _generate(p: argparse.ArgumentParser):
    add_model_argument(p)
    add_backend_argument(p)
    p.add_argument("--prompt", default="ROMEO:", help="text to continue (`</s>` is prepended)")
    p.add_argument("--stream", action="store_true", help="print the text as the tokens are produced")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter folder (PEFT's files, e.g. from opt train --lora-r) to --model")
    p.add_argument("--show-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before the continuation")
    add_threads_argument(p)
    add_load_arguments(p)
    add_sampling_arguments(p)

    def run(args: argparse.Namespace) -> int:
        backend = adapter(args.backend)
        if not args.prompt or not args.prompt.strip():
            raise UsageError("the prompt is empty; pass some text with --prompt")
        folder, config, tokenizer = load_model_and_tokenizer(args.model)
        ids, mask = encode_prompts(tokenizer, config, [args.prompt], args.max_new_tokens)
        backend.module()
        apply_threads(backend, args.threads)
        if args.tp_plan:
            require_distributed_launch("--tp-plan")
            print_on_first_rank_only()
        model = backend.load(folder, **load_options(args))
        if args.adapter:
            backend.module("lora").load_adapter(model, Path(args.adapter))
        kwargs = generation_kwargs(args)
        if args.show_prompt:
            print(args.prompt, end="", flush=True)
        # A streamer only with --stream: TensorFlow decodes without XLA when it has one to call.
        streamer = TextStreamer(tokenizer, config.eos_token_id, out=sys.stdout) if args.stream else None
        t0 = time.perf_counter()
        if streamer is not None:
            out, streamed = generate_streaming(backend, model, ids, streamer, mask, **kwargs)
        else:
            out, streamed = backend.generate(model, ids, mask, **kwargs), False
        total = time.perf_counter() - t0
        new = out[0, ids.shape[1] :]
        if not streamed:
            if args.stream:
                print(f"(the {backend.name} backend's generate takes no streamer yet; the text comes at the end)",
                      file=sys.stderr)
            print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
        n = int((new != config.pad_token_id).sum()) if config.pad_token_id is not None else len(new)
        if streamed:
            rate, how = streamer.decode_rate(), "after the first token: excludes prefill and compilation"
        elif backend.compiles:  # the call above compiled; time the compiled program
            t0 = time.perf_counter()
            backend.generate(model, ids, mask, **kwargs)
            rate, how = (n, n / max(time.perf_counter() - t0, 1e-9)), "second call: excludes compilation"
        else:
            rate, how = (n, n / max(total, 1e-9)), f"{backend.name} runs eagerly: no compilation to exclude"
        speed = f"{rate[1]:.1f} tokens/s ({how})" if rate else "too few tokens to time"
        print(f"[{backend.name}: {n} tokens in {total:.2f} s; {speed}]", file=sys.stderr)
        return 0

    return run
