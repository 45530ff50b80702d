"""The NumPy reference of generation: Hugging Face's logits processors and warpers, and a greedy /
sampling loop over `opt_core.reference`'s forward. Slow (the whole row is recomputed each step) and
exact: the tests hold every backend's processors and seeded sampling to it.

Processors, in Hugging Face 4.57's order (each takes and returns float logits [N, V]; `sequences`
[N, L] are the rows so far, prompt and padding included, as Hugging Face sees them):

    repetition_penalty -> no_repeat_ngram -> min_new_tokens              (always)
    temperature -> top_k -> top_p                                       (sampling only)

then greedy takes the argmax and sampling is `opt_core.sampling.sample_from_logits` (Gumbel-max
over the counter-based stream at generated step t).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from opt_core.generation_config import GenerationConfig, GenerationOptions, resolve_generation_options
from opt_core.inputs import validate_inputs
from opt_core.sampling import sample_from_logits


def apply_repetition_penalty(logits: np.ndarray, sequences: np.ndarray, penalty: float) -> np.ndarray:
    """Every id in `sequences` [N, L]: logit / penalty where > 0, * penalty where < 0."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    rows = np.arange(out.shape[0])[:, None]
    score = out[rows, sequences]
    out[rows, sequences] = np.where(score < 0, score * penalty, score / penalty)
    return out


def banned_ngram_mask(sequences: np.ndarray, ngram_size: int, vocab_size: int) -> np.ndarray:
    """[N, V] True for the tokens that would repeat an n-gram of `sequences` [N, L]: those that
    followed an earlier occurrence of the row's last `ngram_size - 1` tokens."""
    n_rows, length = sequences.shape
    banned = np.zeros((n_rows, vocab_size), dtype=bool)
    if ngram_size <= 0 or length + 1 < ngram_size:
        return banned
    windows = np.lib.stride_tricks.sliding_window_view(sequences, ngram_size, axis=1)  # [N, L-n+1, n]
    tail = sequences[:, length - ngram_size + 1:]  # [N, n-1]
    match = (windows[:, :, :-1] == tail[:, None, :]).all(-1)  # [N, L-n+1]
    for r in range(n_rows):
        banned[r, windows[r, match[r], -1]] = True
    return banned


def apply_no_repeat_ngram(logits: np.ndarray, sequences: np.ndarray, ngram_size: int) -> np.ndarray:
    if ngram_size <= 0:
        return logits
    return np.where(banned_ngram_mask(sequences, ngram_size, logits.shape[-1]), -np.inf, logits).astype(logits.dtype)


def apply_min_new_tokens(logits: np.ndarray, step: int, min_new_tokens: int, eos_ids: tuple[int, ...]) -> np.ndarray:
    """eos ids get -inf while fewer than `min_new_tokens` tokens were generated (`step` of them)."""
    if not eos_ids or step >= min_new_tokens:
        return logits
    out = logits.copy()
    out[:, list(eos_ids)] = -np.inf
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits if temperature == 1.0 else logits / logits.dtype.type(temperature)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep entries >= the k-th largest (ties kept, as HF); top_k 0 or >= V keeps everything."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Drop the least likely tokens whose cumulative probability (ascending) stays <= 1 - top_p;
    the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    shifted = sorted_logits - sorted_logits[:, -1:]
    probs = np.exp(shifted)
    probs = probs / probs.sum(-1, keepdims=True)
    remove_sorted = np.cumsum(probs, axis=-1) <= (1 - top_p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits).astype(logits.dtype)


def process_logits(logits: np.ndarray, sequences: np.ndarray, step: int, opts: GenerationOptions) -> np.ndarray:
    """The processors every mode applies (repetition penalty, no-repeat n-gram, min_new_tokens)."""
    logits = apply_repetition_penalty(logits, sequences, opts.repetition_penalty)
    logits = apply_no_repeat_ngram(logits, sequences, opts.no_repeat_ngram_size)
    return apply_min_new_tokens(logits, step, opts.min_new_tokens, opts.eos_token_ids)


def warp_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling warpers: temperature, then top-k, then top-p."""
    return apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)


def next_tokens(logits: np.ndarray, sequences: np.ndarray, step: int, opts: GenerationOptions) -> np.ndarray:
    """The next token [N] (int64) from float32 last-position logits [N, V]."""
    logits = process_logits(np.asarray(logits, dtype=np.float32), sequences, step, opts)
    if not opts.do_sample:
        return np.argmax(logits, axis=-1).astype(np.int64)
    return sample_from_logits(warp_logits(logits, opts.temperature, opts.top_k, opts.top_p), opts.seed, step)


def reference_generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Greedy decoding or seeded sampling with `model` (a `ReferenceOPTForCausalLM`, or anything
    called as `model(input_ids=, attention_mask=).logits`) under the same contract as the backends
    (`kwargs` are `generate`'s keywords). Returns int64 [B, prompt + generated]. Beam search is not
    part of the reference (its tokens are checked against Hugging Face directly)."""
    ids = np.asarray(input_ids).astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64)
    validate_inputs(ids, mask, model.config, generating=True)
    opts = resolve_generation_options(model.config, generation_config, prompt_length=ids.shape[1], **kwargs)
    if opts.num_beams > 1:
        raise NotImplementedError("the NumPy reference has no beam search")
    eos = np.array(opts.eos_token_ids, dtype=np.int64)
    unfinished = np.ones(ids.shape[0], dtype=bool)
    if opts.streamer is not None:
        opts.streamer.put(ids.copy())
    for step in range(opts.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        tokens = next_tokens(logits, ids, step, opts)
        if eos.size:
            tokens = np.where(unfinished, tokens, opts.pad_token_id)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(tokens)[:, None]], axis=1)
        if opts.streamer is not None:
            opts.streamer.put(tokens.copy())
        if eos.size:
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any():
                break
    if opts.streamer is not None:
        opts.streamer.end()
    return ids
