"""`opt generate`: continue a prompt with any OPT folder (or the bundled model) in any backend.

    opt generate --prompt "ROMEO:"                                   # bundled model, torch, greedy
    opt generate --model DIR --backend flax --prompt "Hello" --do-sample --top-p 0.9 --seed 1
    opt generate --prompt "KING:" --stream                           # text printed as it is produced
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from opt_cli.backends import (
    add_precision_arguments,
    check_backend,
    generate,
    load_causal_lm,
    load_tokenizer,
    precision_kwargs,
    resolve_model_dir,
)
from opt_cli.main import UsageError, register


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (greedy unless --do-sample)")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="> 0; with --do-sample")
    g.add_argument("--top-k", type=int, default=50, help=">= 0, 0 disables; with --do-sample")
    g.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; with --do-sample")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")


def check_sampling(args: argparse.Namespace) -> None:
    """UsageError for decoding values no backend accepts."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


def encode_prompt(tokenizer: Any, config: Any, prompt: str, max_new_tokens: int) -> np.ndarray:
    """[1, T] ids of the prompt (`</s>` first), or a UsageError when it is empty or too long."""
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt")
    ids = np.asarray([tokenizer.encode(prompt)], dtype=np.int64)
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
    return ids


class TextStreamer:
    """Prints decoded text as token ids arrive (torch's `generate(streamer=...)` calls it per step).

    Decodes everything generated so far and prints the new suffix, holding back while the text ends
    in an incomplete UTF-8 sequence (byte-level BPE can split a character across tokens).
    """

    def __init__(self, tokenizer: Any, eos_token_id: int | None, out: Any = None):
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.started = False
        self.done = False

    def __call__(self, tokens: Any) -> None:
        tokens = np.asarray(tokens.detach().cpu() if hasattr(tokens, "detach") else tokens).reshape(-1)
        if not self.started:  # the first call carries the prompt
            self.started = True
            return
        if self.done:
            return
        token = int(tokens[0])
        if self.eos is not None and token == self.eos:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


@register("generate", "Continue a prompt with an OPT model folder (or the bundled model)")
def _generate(p: argparse.ArgumentParser):
    p.add_argument("--model", default="bundled", help="model folder, or 'bundled' (default)")
    p.add_argument("--backend", default="torch", help="torch | tf | flax (default torch)")
    p.add_argument("--prompt", default="ROMEO:", help="text to continue (`</s>` is prepended)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced (torch)")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt before the continuation")
    add_precision_arguments(p)
    add_sampling_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from opt_core import OPTConfig

        backend = check_backend(args.backend)
        check_sampling(args)
        if not args.prompt or not args.prompt.strip():
            raise UsageError("the prompt is empty; pass some text with --prompt")
        folder = resolve_model_dir(args.model)
        config = OPTConfig.from_pretrained(folder)
        tokenizer = load_tokenizer(folder)
        ids = encode_prompt(tokenizer, config, args.prompt, args.max_new_tokens)
        model = load_causal_lm(backend, folder, **precision_kwargs(args))
        if args.show_prompt:
            print(args.prompt, end="", flush=True)
        streamer = None
        if args.stream:
            if backend == "torch":
                streamer = TextStreamer(tokenizer, config.eos_token_id)
            else:
                print(f"(the {backend} backend compiles the whole decoding loop; the text comes at the end)",
                      file=sys.stderr)
        t0 = time.perf_counter()
        out = generate(
            backend, model, ids, np.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            streamer=streamer,
        )
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1] :]
        if streamer is None:
            print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
        n = int((new != config.pad_token_id).sum()) if config.pad_token_id is not None else len(new)
        print(f"[{backend}: {n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s]", file=sys.stderr)
        return 0

    return run
