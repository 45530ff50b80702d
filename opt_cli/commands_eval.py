"""`opt eval-ppl`: perplexity of a model on a text file, by the standard OPT / Hugging Face protocol.

The whole text is tokenized once (`</s>` first, as OPT's tokenizer does) and cut into windows of
`--window` tokens (at most the model's context). With the default stride (= the window) the windows
do not overlap and each token is predicted from the tokens before it in its own window; a smaller
`--stride` slides the window and scores only the tokens not scored before (more context per token,
more compute). Perplexity = exp(total negative log-likelihood / number of predicted tokens).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np

from opt_cli.backends import Adapter, adapter
from opt_cli.errors import UsageError
from opt_cli.options import (
    add_backend_argument,
    add_load_arguments,
    add_model_argument,
    add_threads_argument,
    apply_threads,
    int_in,
    load_options,
)
from opt_cli.paths import input_file, model_folder, tokenizer_folder
from opt_cli.registry import register


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) per window over a stream of `n_tokens`: the window is
    tokens[begin:end] and its tokens at relative index >= max(score_from, 1) are scored.

    No token is scored twice. With non-overlapping windows (stride == window) the first token of each
    window has no context and is not scored, as in Hugging Face's perplexity guide; with a smaller
    stride every token after the first window is scored, with up to `window - stride` tokens of
    context carried over."""
    if window < 2:
        raise UsageError(f"--window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise UsageError(f"--stride must be between 1 and the window ({window}), got {stride}")
    out = []
    scored_until = 0  # tokens [0, scored_until) are done
    begin = 0
    while True:
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(scored_until - begin, 0)))
        scored_until = end
        if end == n_tokens:
            return out
        begin += stride


def perplexity_of_ids(
    backend: Adapter | str, model: Any, ids: np.ndarray, window: int, stride: int, progress: bool = True
) -> dict[str, float]:
    """{"perplexity", "nll", "tokens", "windows"} of a token stream `ids` [n] under `model`."""
    from tqdm import tqdm

    backend = adapter(backend) if isinstance(backend, str) else backend
    spans = windows(len(ids), window, stride)
    total, count = 0.0, 0
    for begin, end, score_from in tqdm(spans, desc="eval-ppl", unit="window", disable=not progress):
        nll, n = backend.token_nll(model, ids[None, begin:end], score_from)
        total += nll
        count += n
    if count == 0:
        raise UsageError("the text is too short: no token to predict")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(spans)}


@register("eval-ppl", "Perplexity of a model on a text file (OPT protocol: windows of the model's context)")
def _eval_ppl(p: argparse.ArgumentParser):
    add_model_argument(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    add_backend_argument(p)
    p.add_argument("--window", type=int_in(2), default=None, metavar="N",
                   help="tokens per window (default: the model's context, which also caps it)")
    p.add_argument("--stride", type=int_in(1), default=None, metavar="N",
                   help="tokens between window starts, 1..window (default: the window)")
    p.add_argument("--max-tokens", type=int_in(2), default=None, metavar="N",
                   help="evaluate only the first N tokens (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(p)
    add_load_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from opt_core import OPTConfig, OPTTokenizer
        from opt_core.data import tokenize_file

        backend = adapter(args.backend)
        text_path = input_file(args.text, "--text")
        folder = model_folder(args.model)
        config = OPTConfig.from_pretrained(folder)
        tokenizer = OPTTokenizer.from_pretrained(tokenizer_folder(folder, what="--model"))
        context = config.max_position_embeddings
        window = context if args.window is None else args.window
        if window > context:
            print(f"note: --window {window} is longer than the model's context; using {context}", file=sys.stderr)
            window = context
        stride = window if args.stride is None else args.stride
        # read and tokenized piece by piece, only as far as --max-tokens needs; `</s>` first, as encode() does
        first = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
        budget = None if args.max_tokens is None else args.max_tokens - len(first)
        ids = np.concatenate([np.asarray(first, dtype=np.int64), tokenize_file(text_path, tokenizer, budget, "--text")])
        windows(len(ids), window, stride)  # argument errors before loading the model
        backend.module()
        apply_threads(backend, args.threads)
        model = backend.load(folder, **load_options(args))
        t0 = time.perf_counter()
        res = perplexity_of_ids(backend, model, ids, window, stride, progress=not args.no_progress)
        dt = time.perf_counter() - t0
        print(f"perplexity {res['perplexity']:.3f}  (mean NLL {res['nll']:.4f} nats over {res['tokens']:,} "
              f"predicted tokens; {res['windows']} windows of {window}, stride {stride}; {backend.name}, {dt:.1f} s)")
        return 0

    return run
