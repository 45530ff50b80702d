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
import time
from typing import Any

import numpy as np

from opt_cli.backends import (
    add_precision_arguments,
    check_backend,
    load_causal_lm,
    load_tokenizer,
    precision_kwargs,
    resolve_model_dir,
    token_nll,
)
from opt_cli.main import UsageError, register


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
    backend: str, model: Any, ids: np.ndarray, window: int, stride: int, progress: bool = True
) -> dict[str, float]:
    """{"perplexity", "nll", "tokens", "windows"} of a token stream `ids` [n] under `model`."""
    from tqdm import tqdm

    spans = windows(len(ids), window, stride)
    total, count = 0.0, 0
    for begin, end, score_from in tqdm(spans, desc="eval-ppl", unit="window", disable=not progress):
        nll, n = token_nll(backend, model, ids[None, begin:end], score_from)
        total += nll
        count += n
    if count == 0:
        raise UsageError("the text is too short: no token to predict")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(spans)}


@register("eval-ppl", "Perplexity of a model on a text file (OPT protocol: windows of the model's context)")
def _eval_ppl(p: argparse.ArgumentParser):
    p.add_argument("--model", default="bundled", help="model folder, or 'bundled'")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--backend", default="torch", help="torch | tf | flax (default torch)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window (capped at the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--no-progress", action="store_true")
    add_precision_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from opt_core import OPTConfig
        from opt_core.data import read_text

        backend = check_backend(args.backend)
        text = read_text(args.text)
        folder = resolve_model_dir(args.model)
        config = OPTConfig.from_pretrained(folder)
        tokenizer = load_tokenizer(folder)
        window = min(args.window, config.max_position_embeddings)
        stride = args.stride or window
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if args.max_tokens is not None:
            if args.max_tokens < 2:
                raise UsageError(f"--max-tokens must be at least 2, got {args.max_tokens}")
            ids = ids[: args.max_tokens]
        windows(len(ids), window, stride)  # argument errors before loading the model
        model = load_causal_lm(backend, folder, **precision_kwargs(args))
        t0 = time.perf_counter()
        res = perplexity_of_ids(backend, model, ids, window, stride, progress=not args.no_progress)
        dt = time.perf_counter() - t0
        print(f"perplexity {res['perplexity']:.3f}  (mean NLL {res['nll']:.4f} nats over {res['tokens']:,} "
              f"predicted tokens; {res['windows']} windows of {window}, stride {stride}; {backend}, {dt:.1f} s)")
        return 0

    return run
