"""The NumPy reference of generation: Hugging Face's logits processors and warpers, and a greedy /
sampling loop over `opt_core.reference`'s forward. Slow (the whole row is recomputed each step) and
exact: the tests hold every backend's processors, seeded sampling and beam search to it.

Processors, in Hugging Face 4.57's order (each takes and returns float logits [N, V]; `sequences`
[N, L] are the rows so far, prompt and padding included, as Hugging Face sees them):

    repetition_penalty -> no_repeat_ngram -> min_new_tokens              (always)
    temperature -> top_k -> top_p                                       (sampling only)

then greedy takes the argmax and sampling is `opt_core.sampling.sample_from_logits` (Gumbel-max
over the counter-based stream at generated step t).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from opt_core.generation_config import GenerationConfig, GenerationOptions, resolve_generation_options
from opt_core.inputs import validate_inputs
from opt_core.sampling import MASK32, check_seed, sample_from_logits


def seed_words(seed: int) -> np.ndarray:
    """The seed (0 <= seed < 2**64) as its low and high 32-bit words, uint32 [2]: how the compiled
    backends (TF, Flax) take it as data, since their integer tensors are 32-bit."""
    seed = check_seed(seed)
    return np.array([seed & MASK32, seed >> 32], np.uint32)


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
    if opts.seed is None:  # resolve_generation_options draws one whenever do_sample is set
        raise ValueError("sampling needs opts.seed; build the options with resolve_generation_options")
    return sample_from_logits(warp_logits(logits, opts.temperature, opts.top_k, opts.top_p), opts.seed, step)


# ---------------------------------------------------------------- beam search (Hugging Face 4.57's algorithm)
NEG = -1.0e9  # Hugging Face's "impossible" beam score, added (not assigned) as HF does


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def gather_beams(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, J]."""
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest entries of each row of x [B, M], largest first; ties go to the
    lower index (torch.topk's and XLA's order on CPU)."""
    return np.argsort(-x, axis=-1, kind="stable")[:, :k]


@dataclasses.dataclass
class BeamState:
    """Beam search's state between steps (Hugging Face's names in brackets). B prompts, K beams,
    L = prompt + max_new_tokens columns, N = max_new_tokens.

    running [B, K, L]: the open beams, prompt included, `fill` beyond the current length
        (`running_sequences`); running_scores [B, K]: their summed log-probs (`running_beam_scores`);
        running_parents [B, K, N]: for each generated step, the flat row (b * K + beam) it extended
        (`running_beam_indices`, -1 before that step).
    finished / finished_scores / finished_parents: the K best finished hypotheses, scores
        length-normalised (`sequences`, `beam_scores`, `beam_indices`); is_finished [B, K] marks the
        slots that hold one (`is_sent_finished`).
    improvable [B, 1]: a running beam can still beat the worst finished one
        (`is_early_stop_heuristic_unsatisfied`).
    """

    running: np.ndarray
    running_scores: np.ndarray
    running_parents: np.ndarray
    finished: np.ndarray
    finished_scores: np.ndarray
    finished_parents: np.ndarray
    is_finished: np.ndarray
    improvable: np.ndarray

    @classmethod
    def start(cls, ids: np.ndarray, num_beams: int, max_new_tokens: int, fill: int) -> BeamState:
        """Every beam of a row starts from its prompt; only beam 0 is live (the others score -1e9),
        so the first step does not pick the same token K times."""
        b, t = ids.shape
        running = np.full((b, num_beams, t + max_new_tokens), fill, dtype=np.int64)
        running[:, :, :t] = ids[:, None, :]
        scores = np.zeros((b, num_beams))
        scores[:, 1:] = NEG
        parents = np.full((b, num_beams, max_new_tokens), -1, dtype=np.int64)
        return cls(running, scores, parents, running.copy(), np.full((b, num_beams), NEG), parents.copy(),
                   np.zeros((b, num_beams), dtype=bool), np.ones((b, 1), dtype=bool))


def beam_search_step(
    state: BeamState, log_probs: np.ndarray, step: int, prompt_length: int, opts: GenerationOptions,
) -> tuple[BeamState, np.ndarray, bool]:
    """One step of Hugging Face 4.57's `_beam_search` on processed log-probs [B * K, V] of the
    running beams at generated step `step`. Returns the new state, the flat row [B * K] each new
    running beam continues (the cache reorder), and whether the search goes on."""
    b, k, max_length = state.running.shape
    vocab = log_probs.shape[-1]
    eos = np.array(opts.eos_token_ids, dtype=np.int64)
    cur_len = prompt_length + step
    # The top max(2, 1 + #eos) * K continuations, so K stay open even if the best all end here.
    keep = max(2, 1 + len(eos)) * k
    scores = (log_probs.reshape(b, k, vocab) + state.running_scores[:, :, None]).reshape(b, k * vocab)
    top = top_k_indices(scores, keep)  # [B, keep]
    top_scores = np.take_along_axis(scores, top, axis=1)
    parent, token = top // vocab, top % vocab
    top_running = gather_beams(state.running, parent)  # [B, keep, L]
    top_running[:, :, cur_len] = token
    top_parents = gather_beams(state.running_parents, parent)
    top_parents[:, :, step] = parent + np.arange(b)[:, None] * k
    hits = np.isin(token, eos) | (cur_len + 1 >= max_length)  # eos or max length: the candidate ends

    # The best K candidates that did not end keep running.
    open_scores = top_scores + hits * NEG
    nxt = top_k_indices(open_scores, k)
    running = gather_beams(top_running, nxt)
    running_scores = gather_beams(open_scores, nxt)
    running_parents = gather_beams(top_parents, nxt)

    # Candidates that ended among the top K join the finished ones if they score higher.
    just_finished = hits & (np.arange(keep) < k)[None, :]
    done_scores = top_scores / float(cur_len + 1 - prompt_length) ** opts.length_penalty
    full = state.is_finished.all(-1, keepdims=True) & (opts.early_stopping is True)
    done_scores = done_scores + full * NEG + ~state.improvable * NEG + ~just_finished * NEG
    merged_scores = np.concatenate([state.finished_scores, done_scores], axis=1)
    best = top_k_indices(merged_scores, k)
    finished = gather_beams(np.concatenate([state.finished, top_running], axis=1), best)
    finished_scores = gather_beams(merged_scores, best)
    finished_parents = gather_beams(np.concatenate([state.finished_parents, top_parents], axis=1), best)
    is_finished = gather_beams(np.concatenate([state.is_finished, just_finished], axis=1), best)

    # Hugging Face's early-stop heuristic: can the best running beam still beat the worst finished?
    if opts.early_stopping == "never" and opts.length_penalty > 0.0:
        best_length = max_length - prompt_length
    else:
        best_length = cur_len + 1 - prompt_length
    best_running = running_scores[:, :1] / float(best_length) ** opts.length_penalty
    worst_finished = np.where(is_finished, finished_scores.min(1, keepdims=True), NEG)
    improvable = state.improvable & (best_running > worst_finished).any(-1, keepdims=True)
    go_on = bool(improvable.any()) and not (bool(is_finished.all()) and opts.early_stopping is True) and not bool(
        hits.all()
    )
    rows = running_parents[:, :, step].reshape(-1)
    new = BeamState(running, running_scores, running_parents, finished, finished_scores, finished_parents,
                    is_finished, improvable)
    return new, rows, go_on


def beam_search_result(state: BeamState, prompt_length: int, num_return_sequences: int) -> np.ndarray:
    """The best `num_return_sequences` hypotheses per prompt [B * n, prompt + generated], cut after
    the longest of them (Hugging Face's trim: generated length = steps with a parent)."""
    seqs = state.finished[:, :num_return_sequences].reshape(-1, state.finished.shape[-1])
    parents = state.finished_parents[:, :num_return_sequences].reshape(-1, state.finished_parents.shape[-1])
    generated = int((parents >= 0).sum(1).max())
    return seqs[:, : prompt_length + generated]


def reference_beam_search(model: Any, ids: np.ndarray, mask: np.ndarray, opts: GenerationOptions) -> np.ndarray:
    """Beam search with the float64 reference model, the whole row recomputed every step."""
    b, t = ids.shape
    k = opts.num_beams
    state = BeamState.start(ids, k, opts.max_new_tokens, opts.beam_fill_id)
    flat_mask = np.concatenate([np.repeat(mask, k, axis=0), np.ones((b * k, opts.max_new_tokens), np.int64)], 1)
    for step in range(opts.max_new_tokens):
        rows = state.running[:, :, : t + step].reshape(b * k, t + step)
        logits = model(input_ids=rows, attention_mask=flat_mask[:, : t + step]).logits[:, -1]
        log_probs = process_logits(log_softmax(np.asarray(logits, dtype=np.float64)), rows, step, opts)
        state, _, go_on = beam_search_step(state, log_probs, step, t, opts)
        if not go_on:
            break
    return beam_search_result(state, t, opts.num_return_sequences)


# ---------------------------------------------------------------- contrastive search (Hugging Face 4.55's algorithm)
def normalize(x: np.ndarray) -> np.ndarray:
    """x / its L2 norm along the last axis."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_choice(top_probs: np.ndarray, context: np.ndarray, context_mask: np.ndarray,
                       candidates: np.ndarray, penalty_alpha: float) -> np.ndarray:
    """Which of the K candidates each row takes (Hugging Face's `_ranking_fast`): the first argmax of
    (1 - alpha) * p(candidate) - alpha * max cosine(candidate's hidden state, an earlier real one).

    top_probs [B, K]; context [B, S, E] the hidden states so far, context_mask [B, S] 1 at real
    tokens; candidates [B, K, E] each candidate's hidden state. Returns [B] indices into K."""
    cosine = np.einsum("bse,bke->bks", normalize(context), normalize(candidates))  # [B, K, S]
    cosine = np.where(context_mask[:, None, :] > 0, cosine, -np.inf)
    score = (1.0 - penalty_alpha) * top_probs - penalty_alpha * cosine.max(-1)
    return np.argmax(score, axis=-1)


def reference_contrastive_search(model: Any, ids: np.ndarray, mask: np.ndarray, opts: GenerationOptions) -> np.ndarray:
    """Contrastive search (Su et al. 2022) with the float64 reference model, every row recomputed:
    each step runs the K most likely tokens of every row one step ahead and keeps the one
    `contrastive_choice` picks. Finished rows are padded with pad_token_id as in greedy decoding."""
    b = ids.shape[0]
    k = opts.top_k
    eos = np.array(opts.eos_token_ids, dtype=np.int64)
    unfinished = np.ones(b, dtype=bool)
    logits = np.asarray(model(input_ids=ids, attention_mask=mask).logits[:, -1], dtype=np.float64)
    for step in range(opts.max_new_tokens):
        probs = softmax(process_logits(logits, ids, step, opts))
        top = top_k_indices(probs, k)  # [B, K]
        rows = np.concatenate([np.repeat(ids, k, 0), top.reshape(-1, 1)], axis=1)  # [B*K, L+1]
        rows_mask = np.concatenate([np.repeat(mask, k, 0), np.ones((b * k, 1), mask.dtype)], axis=1)
        out = model(input_ids=rows, attention_mask=rows_mask)
        hidden = np.asarray(out.last_hidden_state, dtype=np.float64).reshape(b, k, rows.shape[1], -1)
        choice = contrastive_choice(np.take_along_axis(probs, top, 1), hidden[:, 0, :-1], mask, hidden[:, :, -1],
                                    opts.penalty_alpha)
        tokens = top[np.arange(b), choice]
        logits = np.asarray(out.logits, dtype=np.float64).reshape(b, k, rows.shape[1], -1)[np.arange(b), choice, -1]
        if eos.size:
            tokens = np.where(unfinished, tokens, opts.pad_token_id)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(tokens)[:, None]], axis=1)
        if eos.size:
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any():
                break
    return ids


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def reference_generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Greedy decoding, seeded sampling or beam search with `model` (a `ReferenceOPTForCausalLM`, or
    anything called as `model(input_ids=, attention_mask=).logits`) under the same contract as the
    backends (`kwargs` are `generate`'s keywords). Returns int64 [B * num_return_sequences, prompt +
    generated]."""
    ids = np.asarray(input_ids).astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64)
    validate_inputs(ids, mask, model.config, generating=True)
    opts = resolve_generation_options(model.config, generation_config, prompt_length=ids.shape[1], **kwargs)
    if opts.num_beams > 1 and opts.max_new_tokens > 0:
        return reference_beam_search(model, ids, mask, opts)
    if opts.penalty_alpha > 0 and opts.max_new_tokens > 0:
        return reference_contrastive_search(model, ids, mask, opts)
    if opts.num_return_sequences > 1:  # samples: each prompt repeated, rows b * n + j, as Hugging Face
        ids, mask = np.repeat(ids, opts.num_return_sequences, 0), np.repeat(mask, opts.num_return_sequences, 0)
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
