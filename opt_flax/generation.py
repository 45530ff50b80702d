"""Generation: greedy, sampling, beam and contrastive search over a static KV cache, compiled once
per shape.

Like gpt-fast, the pieces are small functions beside the model: `prefill` runs the prompt and fills
the cache; `greedy_or_sample_loop`, `beam_search_loop` and `contrastive_search_loop` (the torch and
TF names) each run the whole decode loop inside one
`jax.lax.while_loop` (no Python per token). Each is a `jax.jit` with the model's `GraphDef` and the
switches that change the graph as static arguments and everything else (state, seed, temperature,
penalties) as data, so a second `generate` with the same shapes reuses the compiled code. Prompts
are left-padded up to a multiple of 8 (a shape bucket): positions come from the mask, so the extra
padding changes nothing but the compile cache key.

Semantics follow Hugging Face 4.57.6 (torch): logits processors in its order (repetition penalty
over the prompt and the generated tokens, no-repeat n-grams, eos forbidden before min_new_tokens),
then temperature, top-k, top-p; finished rows are padded with `pad_token_id`; the output stops
when every row has finished; beam search is Hugging Face's vectorised beam search and contrastive
search 4.55's, both equal to the NumPy reference in opt_core.generation. Sampling draws
from the counter-based stream of `opt_core.sampling` (Gumbel-max), computed here with jnp.uint32
arithmetic, so a seed samples the same tokens as the torch and TF backends.

A streamer (`put`/`end`) gets each step's tokens through an ordered `jax.debug.callback` inside
the loop, compiled in only when a streamer is given.

Letters in shape comments: B batch, K beams, W bucketed prompt width, N max new tokens, V vocab.
"""

from __future__ import annotations

import collections
import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core import sampling as stream
from opt_core.generation import seed_words
from opt_core.generation_config import GENERATE_DOC, GenerationOptions, resolve_generation_options
from opt_core.inputs import validate_inputs
from opt_flax.cache import StaticCache, init_cache

# How many times each jitted function has been traced (= compiled); the no-recompile test reads it.
COMPILATIONS: collections.Counter[str] = collections.Counter()
NEG = -1.0e9  # Hugging Face's "impossible" beam score
BUCKET = 8  # prompt widths are left-padded up to a multiple of this (compile buckets)
# XLA may keep the float32 intermediates of fused bfloat16/float16 ops ("excess precision"); eager
# JAX, torch and TF round every op's result to the compute dtype. In a whole decode loop that moved
# bf16 logits by up to ~0.3 and flipped a 3-ulp near-tie of Hugging Face's bf16 greedy output, so
# the generation jits round as every op does (no effect on float32 models).
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


def compilation_count(name: str | None = None) -> int:
    """Traces so far of one jitted generation function (or of all of them)."""
    return COMPILATIONS[name] if name is not None else sum(COMPILATIONS.values())


# ---------------------------------------------------------------- the random stream (opt_core.sampling)
def fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser on a jnp.uint32 array (wrapping multiply, xor, shift)."""
    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> jnp.uint32(13))
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> jnp.uint32(16))


def random_bits(words: jax.Array, step: jax.Array, rows: int, vocab_size: int) -> jax.Array:
    """`opt_core.sampling.random_bits` in JAX: uint32 [rows, V] for seed words [2] and step `step`."""
    words = jnp.asarray(words, jnp.uint32)
    r = fmix32(fmix32(words[0] ^ jnp.uint32(stream.SEED_SALT)) ^ words[1])
    r = fmix32(r ^ jnp.asarray(step).astype(jnp.uint32))
    r = fmix32(r ^ jnp.arange(rows, dtype=jnp.uint32))  # [rows]
    salt = fmix32(jnp.arange(vocab_size, dtype=jnp.uint32) + jnp.uint32(stream.VOCAB_SALT))  # [V]
    return fmix32(r[:, None] ^ salt[None, :])


def uniforms(words: jax.Array, step: jax.Array, rows: int, vocab_size: int) -> jax.Array:
    """float32 (0, 1) [rows, V]: ((bits >> 8) + 0.5) / 2**24, bit-identical to opt_core.sampling."""
    bits = random_bits(words, step, rows, vocab_size) >> jnp.uint32(8)
    return (bits.astype(jnp.float32) + jnp.float32(0.5)) * jnp.float32(2.0**-24)


def gumbel_noise(words: jax.Array, step: jax.Array, rows: int, vocab_size: int) -> jax.Array:
    """Gumbel(0, 1) noise [rows, V]: -log(-log(u))."""
    return -jnp.log(-jnp.log(uniforms(words, step, rows, vocab_size)))


# ---------------------------------------------------------------- model steps
@functools.partial(jax.jit, static_argnames=("graphdef", "max_length"), compiler_options=COMPILER_OPTIONS)
def prefill(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
            max_length: int) -> tuple[jax.Array, StaticCache]:
    """Run the prompt [B, P] through a fresh cache of `max_length` slots.

    attention_mask is [B, max_length]: the prompt's mask, then ones for the tokens to come.
    Returns the last position's logits [B, V] (float32) and the filled cache.
    """
    COMPILATIONS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, input_ids.shape[0], max_length, model.dtype)
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1, validate=False)
    return out.logits[:, -1].astype(jnp.float32), out.past_key_values


def decode_one_token(model: Any, tokens: jax.Array, position_ids: jax.Array | None, attention_mask: jax.Array,
                     cache: StaticCache) -> tuple[jax.Array, StaticCache]:
    """One step: `tokens` [B, 1] over the cache, attention_mask [B, S]; `position_ids` [B, 1], or
    None to take them from the mask and the cache length (what the loops do). Returns float32
    logits [B, V] and the cache with the token written."""
    out = model(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                validate=False)
    return out.logits[:, -1].astype(jnp.float32), out.past_key_values


def _to_carry(cache: StaticCache) -> StaticCache:
    """The cache as a while loop carries it: a batch of one drops its batch axis ([N, S, H]).

    With a [1, N, S, H] carry, XLA CPU copied every key/value buffer twice per decode step: the
    attention einsums drop the size-1 batch axis, the fused in-place update then ends in a reshape,
    and copy insertion gives up on updating in place. At 2048 slots that is ~300 MB per token for
    opt-125m. Carried without the axis, the update stays in place; larger batches already do."""
    if cache.batch_size != 1:
        return cache
    return StaticCache(tuple(k[0] for k in cache.keys), tuple(v[0] for v in cache.values), cache.length)


def _from_carry(carried: StaticCache, batch: int) -> StaticCache:
    """Inverse of `_to_carry` for a batch of `batch` rows."""
    if batch != 1:
        return carried
    return StaticCache(tuple(k[None] for k in carried.keys), tuple(v[None] for v in carried.values), carried.length)


# ---------------------------------------------------------------- logits processors (Hugging Face order)
def _is_any(tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """bool, same shape as `tokens`: the token is one of `ids` [E] (-1 entries match nothing)."""
    return jnp.any((tokens[..., None] == ids) & (ids >= 0), axis=-1)


def seen_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [R, V]: which ids occur in each row of `tokens` [R, L] (NumPy, on the host)."""
    seen = np.zeros((tokens.shape[0], vocab_size), bool)
    seen[np.arange(tokens.shape[0])[:, None], tokens] = True
    return seen


def banned_ngram_tokens(tokens: jax.Array, length: jax.Array, first: jax.Array, n: int, vocab_size: int
                        ) -> jax.Array:
    """bool [R, V]: Hugging Face's no-repeat-n-gram bans for rows `tokens` [R, C] whose columns
    [first, length) hold the sequence: the ids that would repeat one of its n-grams."""
    r, c = tokens.shape
    windows = c - n + 1  # n-gram start columns
    if windows <= 0:
        return jnp.zeros((r, vocab_size), bool)
    starts = jnp.arange(windows)
    last = jnp.take(tokens, jnp.maximum(length - (n - 1) + jnp.arange(n - 1), 0), axis=1)  # [R, n-1]
    match = jnp.broadcast_to((starts >= first) & (starts <= length - n), (r, windows))
    for m in range(n - 1):
        match = match & (tokens[:, m : m + windows] == last[:, m : m + 1])
    follow = tokens[:, n - 1 : n - 1 + windows]  # [R, W]: each n-gram's last token
    return jnp.zeros((r, vocab_size), bool).at[jnp.arange(r)[:, None], follow].max(match)


def penalise_seen(logits: jax.Array, seen: jax.Array, penalty: Any) -> jax.Array:
    """Hugging Face's repetition penalty on the ids marked in `seen` [R, V]: / penalty where > 0,
    * penalty where < 0."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def apply_repetition_penalty(logits: jax.Array, sequences: Any, penalty: Any) -> jax.Array:
    """The repetition penalty over every id of `sequences` [R, L] (prompt and padding included)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    seen = jnp.zeros(logits.shape, bool).at[rows, jnp.asarray(sequences)].set(True)
    return penalise_seen(logits, seen, penalty)


def apply_no_repeat_ngram(logits: jax.Array, sequences: Any, ngram_size: int, length: Any = None,
                          first: Any = 0) -> jax.Array:
    """-inf on the ids that would repeat an `ngram_size`-gram of `sequences` [R, C] (columns
    [first, length); default all)."""
    sequences = jnp.asarray(sequences)
    length = sequences.shape[1] if length is None else length
    banned = banned_ngram_tokens(sequences, length, first, ngram_size, logits.shape[-1])
    return jnp.where(banned, -jnp.inf, logits)


def apply_min_new_tokens(logits: jax.Array, step: Any, min_new_tokens: Any, eos_ids: Any) -> jax.Array:
    """-inf on the eos ids while `step` < `min_new_tokens` (step = tokens generated so far)."""
    is_eos = _is_any(jnp.arange(logits.shape[-1]), jnp.asarray(eos_ids, jnp.int32))  # [V]
    return jnp.where(is_eos[None, :] & (step < min_new_tokens), -jnp.inf, logits)


def process_logits(logits: jax.Array, step: jax.Array, seen: jax.Array | None, sequences: jax.Array | None,
                   length: jax.Array, first: Any, eos_ids: jax.Array, repetition_penalty: jax.Array,
                   min_new_tokens: jax.Array, ngram: int, min_new: bool) -> jax.Array:
    """Hugging Face's processors in its order on logits [R, V] at generated step `step` (the same
    signature in opt_tf): repetition penalty over `seen` [R, V] (None = off), no-repeat
    `ngram`-grams over `sequences` [R, C] (columns [first, length) filled), then eos forbidden
    while fewer than `min_new_tokens` tokens are new (`min_new`)."""
    if seen is not None:
        logits = penalise_seen(logits, seen, repetition_penalty)
    if ngram:
        logits = apply_no_repeat_ngram(logits, sequences, ngram, length, first)
    if min_new:
        logits = apply_min_new_tokens(logits, step, min_new_tokens, eos_ids)
    return logits


def apply_temperature(logits: jax.Array, temperature: Any) -> jax.Array:
    return logits / temperature


def apply_top_k(logits: jax.Array, top_k: Any) -> jax.Array:
    """Keep entries >= the k-th largest (k may be traced; 0 or >= V keeps everything); the rest -inf."""
    vocab = logits.shape[-1]
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V]
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.full((logits.shape[0], 1), k - 1), axis=-1)  # [B, 1]
    return jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)


def apply_top_p(logits: jax.Array, top_p: Any) -> jax.Array:
    """Nucleus filtering (1.0 = off): drop the smallest tokens whose cumulative probability stays
    <= 1 - top_p, always keep the most likely."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_asc = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where((top_p < 1.0) & remove, -jnp.inf, logits)


def warp_logits(logits: jax.Array, temperature: Any, top_k: Any, top_p: Any) -> jax.Array:
    """Temperature, then top-k (0 = off), then top-p (1.0 = off), as Hugging Face's warpers do.
    logits [B, V] float32; removed entries get -inf."""
    return apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)


# ---------------------------------------------------------------- streaming (host callback)
# The streamers of the calls in progress, by call id: the compiled loop passes its call's id (data,
# so a new call does not recompile) back to the host with each step's tokens.
_STREAMERS: dict[int, Any] = {}
_CALL_IDS = itertools.count()


def _deliver(call_id: Any, tokens: Any) -> None:
    _STREAMERS[int(call_id)].put(np.asarray(tokens).astype(np.int64))


# ---------------------------------------------------------------- greedy and sampling
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample", "ngram", "min_new",
                                             "stream"), compiler_options=COMPILER_OPTIONS)
def greedy_or_sample_loop(graphdef: nnx.GraphDef, state: nnx.State, first_logits: jax.Array, cache: StaticCache,
                          attention_mask: jax.Array, prompt: jax.Array, first: jax.Array, seen: jax.Array | None,
                          max_new_tokens: int, do_sample: bool, eos_ids: jax.Array, pad_token_id: jax.Array,
                          seed: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                          repetition_penalty: jax.Array, min_new_tokens: jax.Array, ngram: int = 0,
                          min_new: bool = False, stream: bool = False, call_id: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
    """Decode up to `max_new_tokens` tokens per row inside one while_loop (`call_id`: with `stream`,
    the key of this call's streamer in `_STREAMERS`).

    prompt [B, W] is the bucketed prompt (its real columns start at `first`), seen [B, V] the ids in
    the prompt (None: no repetition penalty), eos_ids [E] (-1 = none), seed the uint32 words [2].
    Returns the new tokens [B, max_new_tokens] (pad after a row finished) and the number of steps
    taken (the loop stops early once every row has produced an eos id).
    """
    COMPILATIONS["greedy_or_sample_loop"] += 1
    model = nnx.merge(graphdef, state)
    b, vocab = first_logits.shape
    width = prompt.shape[1]

    def cond(carry: tuple) -> jax.Array:
        step, _, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry: tuple) -> tuple:
        step, tokens, logits, carried, finished, seen = carry
        full = jnp.concatenate([prompt, tokens], axis=1) if ngram else None
        logits = process_logits(logits, step, seen, full, width + step, first, eos_ids, repetition_penalty,
                                min_new_tokens, ngram, min_new)
        if do_sample:
            noise = gumbel_noise(seed, step, b, vocab)
            nxt = jnp.argmax(warp_logits(logits, temperature, top_k, top_p) + noise, axis=-1)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt = jnp.where(finished, pad_token_id, nxt).astype(jnp.int32)  # [B]
        if stream:
            jax.debug.callback(_deliver, call_id, nxt, ordered=True)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        finished = finished | _is_any(nxt, eos_ids)
        if seen is not None:
            seen = seen | (jnp.arange(vocab)[None, :] == nxt[:, None])
        logits, cache = decode_one_token(model, nxt[:, None], None, attention_mask, _from_carry(carried, b))
        return step + 1, tokens, logits, _to_carry(cache), finished, seen

    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    carry = (jnp.int32(0), tokens, first_logits, _to_carry(cache), jnp.zeros((b,), bool), seen)
    step, tokens, *_ = jax.lax.while_loop(cond, body, carry)
    return tokens, step


# ---------------------------------------------------------------- beam search
def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, J]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class BeamState(NamedTuple):
    """Beam search's state between steps: opt_core.generation.BeamState's fields as arrays, except
    that `running` and `finished` hold only the new tokens [B, K, N] (the bucketed prompt is the
    same for every beam of a row and lives beside them)."""

    running: jax.Array
    running_scores: jax.Array
    running_parents: jax.Array
    finished: jax.Array
    finished_scores: jax.Array
    finished_parents: jax.Array
    is_finished: jax.Array
    improvable: jax.Array


class BeamLoop(NamedTuple):
    """What the beam search while-loop carries from one step to the next."""

    step: jax.Array  # int32: tokens generated so far
    state: BeamState
    cache: StaticCache  # B*K rows
    logits: jax.Array  # [B*K, V] of the running beams' last tokens
    seen: jax.Array | None  # [B*K, V] ids in each running beam (repetition penalty)
    go_on: jax.Array  # bool: Hugging Face's "beam search has unfinished sequences"


def beam_search_step(state: BeamState, log_probs: jax.Array, step: jax.Array, num_eos: int,
                     eos_ids: jax.Array, length_penalty: jax.Array, early_stopping: bool | str
                     ) -> tuple[BeamState, jax.Array, jax.Array]:
    """One step of Hugging Face 4.57's `_beam_search` (opt_core.generation.beam_search_step) on
    processed log-probs [B*K, V]; the search may run N = running.shape[2] new tokens. Returns the
    new state, the flat row [B*K] each running beam continues (the cache reorder) and go-on."""
    b, k, n = state.running.shape
    vocab = log_probs.shape[-1]
    keep = max(2, 1 + num_eos) * k  # K stay open even if the best all end here
    scores = (log_probs.reshape(b, k, vocab) + state.running_scores[:, :, None]).reshape(b, k * vocab)
    top_scores, top = jax.lax.top_k(scores, keep)  # [B, keep]
    parent, token = top // vocab, (top % vocab).astype(jnp.int32)
    top_running = jax.lax.dynamic_update_slice(_gather_beams(state.running, parent), token[:, :, None], (0, 0, step))
    flat_parent = (parent + jnp.arange(b)[:, None] * k).astype(jnp.int32)
    top_parents = jax.lax.dynamic_update_slice(_gather_beams(state.running_parents, parent), flat_parent[:, :, None],
                                               (0, 0, step))
    hits = (step + 1 >= n) | _is_any(token, eos_ids)  # max length or eos: the candidate ends

    # The best K candidates that did not end keep running.
    open_scores = top_scores + hits * NEG
    _, nxt = jax.lax.top_k(open_scores, k)
    running = _gather_beams(top_running, nxt)
    running_scores = _gather_beams(open_scores, nxt)
    running_parents = _gather_beams(top_parents, nxt)

    # Candidates that ended among the top K join the finished ones if they score higher.
    just_finished = hits & (jnp.arange(keep) < k)[None, :]
    done_scores = top_scores / ((step + 1).astype(jnp.float32) ** length_penalty)
    full = jnp.all(state.is_finished, axis=-1, keepdims=True) & (early_stopping is True)
    done_scores = done_scores + full * NEG + (~state.improvable) * NEG + (~just_finished) * NEG
    merged_scores = jnp.concatenate([state.finished_scores, done_scores], axis=1)  # [B, K + keep]
    _, best = jax.lax.top_k(merged_scores, k)
    finished = _gather_beams(jnp.concatenate([state.finished, top_running], axis=1), best)
    finished_scores = _gather_beams(merged_scores, best)
    finished_parents = _gather_beams(jnp.concatenate([state.finished_parents, top_parents], axis=1), best)
    is_finished = _gather_beams(jnp.concatenate([state.is_finished, just_finished], axis=1), best)

    # Hugging Face's early-stop heuristic: can the best running beam still beat the worst finished?
    best_length = (step + 1).astype(jnp.float32)
    if early_stopping == "never":
        best_length = jnp.where(length_penalty > 0.0, jnp.float32(n), best_length)
    best_running = running_scores[:, :1] / best_length**length_penalty
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
    improvable = state.improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
    go_on = jnp.any(improvable) & ~(jnp.all(is_finished) & (early_stopping is True)) & ~jnp.all(hits)
    rows = running_parents[:, :, step].reshape(-1)
    new = BeamState(running, running_scores, running_parents, finished, finished_scores, finished_parents,
                    is_finished, improvable)
    return new, rows, go_on


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_beams", "early_stopping", "ngram",
                                             "min_new", "num_return_sequences"), compiler_options=COMPILER_OPTIONS)
def beam_search_loop(graphdef: nnx.GraphDef, state: nnx.State, first_logits: jax.Array, cache: StaticCache,
                     attention_mask: jax.Array, prompt: jax.Array, first: jax.Array, seen: jax.Array | None,
                     max_new_tokens: int, num_beams: int, early_stopping: bool | str, eos_ids: jax.Array,
                     pad_token_id: jax.Array, length_penalty: jax.Array, repetition_penalty: jax.Array,
                     min_new_tokens: jax.Array, ngram: int = 0, min_new: bool = False, num_return_sequences: int = 1
                     ) -> tuple[jax.Array, jax.Array]:
    """Hugging Face's beam search (4.57), one while_loop, equal to
    opt_core.generation.reference_beam_search.

    first_logits [B, V] and cache/attention_mask with B rows: the prompt was run once per row and
    is copied to its K beams here. prompt, first, seen, eos_ids as in `greedy_or_sample_loop`;
    pad_token_id is the fill of unfinished columns. Returns the best `num_return_sequences`
    hypotheses' new tokens per prompt [B * n, max_new_tokens] and the number of new tokens kept
    (Hugging Face's trimmed length).
    """
    COMPILATIONS["beam_search_loop"] += 1
    model = nnx.merge(graphdef, state)
    b, vocab = first_logits.shape
    k, n = num_beams, max_new_tokens
    width = prompt.shape[1]
    # Hugging Face keeps max(2, 1 + #eos) * K candidates; the [-1] placeholder of "no eos" counts as
    # one eos there, which gives the same 2 * K.
    num_eos = int(eos_ids.shape[0])

    beams = jnp.repeat(jnp.arange(b), k)  # [B*K]: each beam's prompt row, beams of a row adjacent
    mask = attention_mask[beams]  # [B*K, S]
    flat_prompt = prompt[beams]  # [B*K, W]

    def cond(c: BeamLoop) -> jax.Array:
        return (c.step < n) & c.go_on

    def body(c: BeamLoop) -> BeamLoop:
        log_probs = jax.nn.log_softmax(c.logits, axis=-1)  # [B*K, V]
        rows_so_far = jnp.concatenate([flat_prompt, c.state.running.reshape(b * k, n)], axis=1) if ngram else None
        log_probs = process_logits(log_probs, c.step, c.seen, rows_so_far, width + c.step, first, eos_ids,
                                   repetition_penalty, min_new_tokens, ngram, min_new)
        beam, rows, go_on = beam_search_step(c.state, log_probs, c.step, num_eos, eos_ids, length_penalty,
                                             early_stopping)
        nxt = beam.running[:, :, c.step].reshape(-1)  # [B*K]
        seen = c.seen
        if seen is not None:
            seen = seen[rows] | (jnp.arange(vocab)[None, :] == nxt[:, None])
        logits, cache = decode_one_token(model, nxt[:, None], None, mask, c.cache.reorder(rows))
        return BeamLoop(c.step + 1, beam, cache, logits, seen, go_on)

    running = jnp.full((b, k, n), pad_token_id, jnp.int32)
    parents = jnp.full((b, k, n), -1, jnp.int32)
    scores = jnp.where(jnp.arange(k)[None, :] == 0, 0.0, NEG) * jnp.ones((b, 1))  # only beam 0 is live at first
    beam = BeamState(running, scores, parents, running, jnp.full((b, k), NEG), parents, jnp.zeros((b, k), bool),
                     jnp.ones((b, 1), bool))
    start = BeamLoop(jnp.int32(0), beam, cache.reorder(beams), first_logits[beams], None if seen is None else
                     seen[beams], jnp.bool_(True))
    end = jax.lax.while_loop(cond, body, start)
    m = num_return_sequences
    kept = end.state.finished_parents[:, :m].reshape(b * m, n)
    return end.state.finished[:, :m].reshape(b * m, n), jnp.max(jnp.sum(kept >= 0, axis=1))


# ---------------------------------------------------------------- contrastive search
def contrastive_choice(top_probs: jax.Array, context: jax.Array, context_mask: jax.Array, candidates: jax.Array,
                       penalty_alpha: jax.Array) -> jax.Array:
    """Which of the K candidates each row takes (opt_core.generation.contrastive_choice): the first
    argmax of (1 - alpha) * p - alpha * max cosine(candidate, an earlier real hidden state).
    top_probs [B, K]; context [B, S, E] with context_mask [B, S]; candidates [B, K, E] -> [B]."""
    def unit(x: jax.Array) -> jax.Array:
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # HF divides by the norm, no epsilon

    cosine = jnp.einsum("BSE,BKE->BKS", unit(context), unit(candidates))
    cosine = jnp.where(context_mask[:, None, :] > 0, cosine, -jnp.inf)
    score = (1.0 - penalty_alpha) * top_probs - penalty_alpha * jnp.max(cosine, axis=-1)
    return jnp.argmax(score, axis=-1)


class ContrastiveLoop(NamedTuple):
    """What the contrastive-search while-loop carries from one step to the next."""

    step: jax.Array  # int32: tokens generated so far
    tokens: jax.Array  # [B, N] new tokens (pad after a row finished)
    logits: jax.Array  # [B, V] of each row's last token
    cache: StaticCache  # B*K rows, the K rows of a prompt identical between steps
    context: jax.Array  # [B, S, E] float32 hidden states the candidates are held against
    context_mask: jax.Array  # [B, S] 1 at real tokens so far
    finished: jax.Array  # [B] bool
    seen: jax.Array | None  # [B, V] ids in each row (repetition penalty)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "ngram", "min_new"),
                   compiler_options=COMPILER_OPTIONS)
def contrastive_search_loop(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, attention_mask: jax.Array,
                            first: jax.Array, seen: jax.Array | None, max_new_tokens: int, top_k: int,
                            eos_ids: jax.Array, pad_token_id: jax.Array, penalty_alpha: jax.Array,
                            repetition_penalty: jax.Array, min_new_tokens: jax.Array, ngram: int = 0,
                            min_new: bool = False) -> tuple[jax.Array, jax.Array]:
    """Contrastive search as Hugging Face 4.55, equal to opt_core.generation.reference_contrastive_search.

    The bucketed prompt [B, W] runs once (here: the prompt's hidden states are part of the search)
    and its cache is copied to K rows per prompt; each step runs the top_k candidates one token
    ahead in those rows, keeps the one `contrastive_choice` picks and copies its row over the other
    K - 1. attention_mask [B, W + N]; first, seen, eos_ids as in `greedy_or_sample_loop`. Returns
    the new tokens [B, N] (pad after a row finished) and the number of steps taken.
    """
    COMPILATIONS["contrastive_search_loop"] += 1
    model = nnx.merge(graphdef, state)
    b, width = prompt.shape
    k, n = top_k, max_new_tokens
    vocab = model.config.vocab_size
    cache = init_cache(model.config, b, width + n, model.dtype)
    out = model(prompt, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1, validate=False)
    context = jnp.pad(out.last_hidden_state.astype(jnp.float32), ((0, 0), (0, n), (0, 0)))  # [B, S, E]
    context_mask = attention_mask.at[:, width:].set(0)
    rows = jnp.arange(b)
    mask_k = jnp.repeat(attention_mask, k, axis=0)  # [B*K, S]

    def cond(c: ContrastiveLoop) -> jax.Array:
        return (c.step < n) & ~jnp.all(c.finished)

    def body(c: ContrastiveLoop) -> ContrastiveLoop:
        full = jnp.concatenate([prompt, c.tokens], axis=1) if ngram else None
        processed = process_logits(c.logits, c.step, c.seen, full, width + c.step, first, eos_ids,
                                   repetition_penalty, min_new_tokens, ngram, min_new)
        top_probs, top_ids = jax.lax.top_k(jax.nn.softmax(processed, axis=-1), k)  # [B, K]
        cand = model(top_ids.reshape(-1, 1), attention_mask=mask_k, past_key_values=c.cache, validate=False)
        cand_hidden = cand.last_hidden_state[:, -1].astype(jnp.float32).reshape(b, k, -1)  # [B, K, E]
        choice = contrastive_choice(top_probs, c.context, c.context_mask, cand_hidden, penalty_alpha)
        picked = rows * k + choice
        cache = cand.past_key_values.reorder(jnp.repeat(picked, k))  # every row of a prompt continues from it
        context = jax.lax.dynamic_update_slice(c.context, cand_hidden[rows, choice][:, None, :],
                                               (0, width + c.step, 0))
        context_mask = jax.lax.dynamic_update_slice(c.context_mask, jnp.ones((b, 1), c.context_mask.dtype),
                                                    (0, width + c.step))
        nxt = jnp.where(c.finished, pad_token_id, top_ids[rows, choice]).astype(jnp.int32)  # [B]
        tokens = jax.lax.dynamic_update_slice(c.tokens, nxt[:, None], (0, c.step))
        seen = c.seen
        if seen is not None:
            seen = seen | (jnp.arange(vocab)[None, :] == nxt[:, None])
        return ContrastiveLoop(c.step + 1, tokens, cand.logits[:, -1].astype(jnp.float32)[picked], cache, context,
                               context_mask, c.finished | _is_any(nxt, eos_ids), seen)

    start = ContrastiveLoop(jnp.int32(0), jnp.full((b, n), pad_token_id, jnp.int32),
                            out.logits[:, -1].astype(jnp.float32), out.past_key_values.reorder(jnp.repeat(rows, k)),
                            context, context_mask, jnp.zeros((b,), bool), seen)
    end = jax.lax.while_loop(cond, body, start)
    return end.tokens, end.step


# ---------------------------------------------------------------- the public entry point
def _bucket(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple if multiple > 1 else length


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    streamer: Any = None,
    early_stopping: bool | str | None = None,
    num_return_sequences: int | None = None,
    penalty_alpha: float | None = None,
) -> np.ndarray:
    cfg = model.config
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    validate_inputs(ids, mask, cfg, generating=True)
    o = resolve_generation_options(
        cfg, getattr(model, "generation_config", None), prompt_length=ids.shape[1], max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        num_beams=num_beams, length_penalty=length_penalty, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
        streamer=streamer, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        penalty_alpha=penalty_alpha,
    )
    return run(model, ids, mask, o)


generate.__doc__ = GENERATE_DOC + """
Flax: prefill and the decode loop are `jax.jit`s (one `lax.while_loop`), compiled once per shape
bucket and mode; a streamer is fed by an ordered `jax.debug.callback`. Returns NumPy int64.
"""


def run(model: Any, ids: np.ndarray, mask: np.ndarray, o: GenerationOptions) -> np.ndarray:
    """Generate with resolved options `o` (`opt_core.generation_config.resolve_generation_options`)
    from checked inputs ids / mask [B, T]; returns NumPy int64 [B, T + generated]."""
    cfg = model.config
    streamer, max_new_tokens, eos, pad = o.streamer, o.max_new_tokens, list(o.eos_token_ids), o.pad_token_id
    if o.num_beams == 1 and o.num_return_sequences > 1:  # samples: rows b * n + j, as Hugging Face
        ids, mask = np.repeat(ids, o.num_return_sequences, 0), np.repeat(mask, o.num_return_sequences, 0)
    if streamer is not None:
        streamer.put(ids.astype(np.int64))
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return ids.astype(np.int64)

    b, t = ids.shape
    width = max(min(_bucket(t, BUCKET), cfg.max_position_embeddings - max_new_tokens), t)
    extra = width - t  # left padding added for the shape bucket
    ids_b = np.concatenate([np.full((b, extra), pad, ids.dtype), ids], axis=1).astype(np.int32)
    mask_full = np.concatenate([np.zeros((b, extra), np.int32), mask.astype(np.int32),
                                np.ones((b, max_new_tokens), np.int32)], axis=1)  # [B, S]
    graphdef, state = nnx.split(model)
    max_length = width + max_new_tokens
    if o.penalty_alpha == 0:  # contrastive search runs the prompt inside its own loop (it needs the hidden states)
        logits, cache = prefill(graphdef, state, jnp.asarray(ids_b), jnp.asarray(mask_full), max_length)
    seen = jnp.asarray(seen_tokens(ids, cfg.vocab_size)) if o.repetition_penalty != 1.0 else None
    eos_ids = jnp.asarray(eos if eos else [-1], jnp.int32)
    common = dict(prompt=jnp.asarray(ids_b), first=jnp.int32(extra), seen=seen, max_new_tokens=max_new_tokens,
                  eos_ids=eos_ids, pad_token_id=jnp.int32(pad), repetition_penalty=jnp.float32(o.repetition_penalty),
                  min_new_tokens=jnp.int32(o.min_new_tokens), ngram=o.no_repeat_ngram_size,
                  min_new=bool(o.min_new_tokens > 0 and eos))
    if o.penalty_alpha > 0:
        new, count = contrastive_search_loop(graphdef, state, attention_mask=jnp.asarray(mask_full), top_k=o.top_k,
                                             penalty_alpha=jnp.float32(o.penalty_alpha), **common)
    elif o.num_beams > 1:
        # Unfinished columns are filled as Hugging Face does (pad or, for pad id 0, the first eos).
        common["pad_token_id"] = jnp.int32(o.beam_fill_id)
        new, count = beam_search_loop(graphdef, state, logits, cache, jnp.asarray(mask_full), num_beams=o.num_beams,
                                      early_stopping=o.early_stopping, length_penalty=jnp.float32(o.length_penalty),
                                      num_return_sequences=o.num_return_sequences, **common)
        ids = np.repeat(ids, o.num_return_sequences, 0)
    else:
        call_id = next(_CALL_IDS) % 2**31
        if streamer is not None:
            _STREAMERS[call_id] = streamer
        try:
            new, count = greedy_or_sample_loop(
                graphdef, state, logits, cache, jnp.asarray(mask_full), do_sample=o.do_sample,
                seed=jnp.asarray(seed_words(o.seed or 0)), temperature=jnp.float32(o.temperature),
                top_k=jnp.int32(o.top_k if o.do_sample else 0), top_p=jnp.float32(o.top_p),
                stream=streamer is not None, call_id=jnp.int32(call_id), **common)
            count = int(count)
            if streamer is not None:
                jax.effects_barrier()  # every callback has run
        finally:
            _STREAMERS.pop(call_id, None)
    if streamer is not None:
        streamer.end()
    return np.concatenate([ids.astype(np.int64), np.asarray(new[:, : int(count)], np.int64)], axis=1)
