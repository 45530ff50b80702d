"""Generation for `OPTForCausalLM`: greedy, sampling, beam and contrastive search, each one
XLA-compiled function (`greedy_or_sample_loop`, `beam_search_loop`, `contrastive_search_loop`: the
torch and Flax names).

The whole decode loop is a `tf.while_loop` inside `tf.function(jit_compile=True)`: the prompt is
run once into a static cache (`opt_tf.cache`), then each step processes the logits, picks the next
tokens and runs them. Compiled functions are kept per model and per static setting (values such as
temperature, top_p, repetition_penalty, min_new_tokens and the seed are tensors), so a second call
with the same shapes does not retrace.

Semantics follow Hugging Face 4.57.6 (torch): logits processors in its order (repetition penalty
over the prompt and the generated tokens, no-repeat n-grams, eos forbidden before min_new_tokens),
then temperature, top-k, top-p; finished rows are padded with the pad id and the loop stops when
every row has finished; beam search is Hugging Face's vectorised beam search and contrastive search
4.55's, both equal to the NumPy reference in opt_core.generation (prompt run once, cache copied to
the beams). Sampling draws from
the counter-based stream of `opt_core.sampling` (Gumbel-max), computed here with tf.uint32
arithmetic, so a seed samples the same tokens as the torch and Flax backends.

A streamer (`put`/`end`) gets each step's tokens through a `tf.numpy_function` inside the loop;
XLA cannot compile a host call, so that one variant runs the same loop as a plain graph function
(the no-streamer path is compiled exactly as before).

Letters in shape comments: B batch, K beams, T prompt, N max new tokens, S = T + N, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

from opt_core import sampling as stream
from opt_core.generation import seed_words
from opt_core.generation_config import GENERATE_DOC, GenerationOptions, resolve_generation_options
from opt_core.inputs import validate_inputs
from opt_tf.attention import positions_from_mask
from opt_tf.cache import StaticCache, init_cache

NEG = -1.0e9  # Hugging Face's "impossible" score in beam search
INF = float("inf")


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the compiled graph (shapes aside): one compiled function each."""

    total_length: int  # S: slots of the static cache (prompt + new tokens)
    do_sample: bool = False
    top_k: int = 0  # 0 = off
    num_beams: int = 1
    num_eos: int = 1  # how many eos ids (0 = never stop early); the ids, pad and length_penalty are tensors
    early_stopping: bool | str = False
    repetition_penalty: bool = False  # whether the penalty runs (its value is a tensor)
    no_repeat_ngram_size: int = 0
    min_new_tokens: bool = False  # whether eos can be forbidden (the count is a tensor)
    num_return_sequences: int = 1  # beam search: hypotheses returned per prompt
    contrastive: bool = False  # contrastive search (top_k candidates per step; alpha is a tensor)
    stream: bool = False  # deliver each step's tokens to the host (graph mode, not XLA)


class Knobs(NamedTuple):
    """The values a compiled function takes as tensors (changing them never retraces)."""

    seed: tf.Tensor  # uint32 [2]: the seed's low and high words (`seed_words`)
    temperature: tf.Tensor  # float32
    top_p: tf.Tensor  # float32
    repetition_penalty: tf.Tensor  # float32
    min_new_tokens: tf.Tensor  # int32
    eos_ids: tf.Tensor  # int32 [max(1, num_eos)]; -1 = none
    pad_token_id: tf.Tensor  # int32
    length_penalty: tf.Tensor  # float32
    penalty_alpha: tf.Tensor  # float32: contrastive search's degeneration weight


# ---------------------------------------------------------------- the random stream (opt_core.sampling)
def _u32(value: int) -> tf.Tensor:
    return tf.constant(value, tf.uint32)


def fmix32(x: tf.Tensor) -> tf.Tensor:
    """MurmurHash3's 32-bit finaliser on a tf.uint32 tensor (wrapping multiply, xor, shift)."""
    xor, shr = tf.bitwise.bitwise_xor, tf.bitwise.right_shift
    x = xor(x, shr(x, _u32(16)))
    x = x * _u32(0x85EBCA6B)
    x = xor(x, shr(x, _u32(13)))
    x = x * _u32(0xC2B2AE35)
    return xor(x, shr(x, _u32(16)))


def random_bits(words: tf.Tensor, step: tf.Tensor, rows: Any, vocab_size: int) -> tf.Tensor:
    """`opt_core.sampling.random_bits` in TF: uint32 [rows, V] for seed words [2] and step `step`."""
    xor = tf.bitwise.bitwise_xor
    r = fmix32(xor(fmix32(xor(words[0], _u32(stream.SEED_SALT))), words[1]))
    r = fmix32(xor(r, tf.cast(step, tf.uint32)))
    r = fmix32(xor(r, tf.cast(tf.range(rows), tf.uint32)))  # [rows]
    salt = fmix32(tf.cast(tf.range(vocab_size), tf.uint32) + _u32(stream.VOCAB_SALT))  # [V]
    return fmix32(xor(r[:, None], salt[None, :]))


def uniforms(words: tf.Tensor, step: tf.Tensor, rows: Any, vocab_size: int) -> tf.Tensor:
    """float32 (0, 1) [rows, V]: ((bits >> 8) + 0.5) / 2**24, bit-identical to opt_core.sampling."""
    bits = tf.bitwise.right_shift(random_bits(words, step, rows, vocab_size), _u32(8))
    return (tf.cast(bits, tf.float32) + 0.5) * (2.0**-24)


def gumbel_noise(words: tf.Tensor, step: tf.Tensor, rows: Any, vocab_size: int) -> tf.Tensor:
    """Gumbel(0, 1) noise [rows, V]: -log(-log(u))."""
    return -tf.math.log(-tf.math.log(uniforms(words, step, rows, vocab_size)))


# ---------------------------------------------------------------- model steps (graph code)
def _forward(
    model: Any, ids: tf.Tensor, positions: tf.Tensor, attention_mask: tf.Tensor, cache: StaticCache
) -> tuple[tf.Tensor, StaticCache]:
    """New tokens [B, t] at `positions` [B, t] -> logits of the last one [B, V] (float32) and the
    advanced cache; attention_mask [B, S] covers every cache slot."""
    out = model.get_decoder()(ids, positions, attention_mask, past_key_values=cache, training=False)
    logits = model.lm_logits(out.last_hidden_state[:, -1:])[:, 0]  # [B, V]
    return tf.cast(logits, tf.float32), out.past_key_values


def decode_one_token(
    model: Any, tokens: tf.Tensor, position_ids: tf.Tensor, attention_mask: tf.Tensor, cache: StaticCache
) -> tuple[tf.Tensor, StaticCache]:
    """One step: `tokens` [B, 1] at `position_ids` [B, 1] over the cache, attention_mask [B, S].
    Returns float32 logits [B, V] and the advanced cache."""
    return _forward(model, tokens, position_ids, attention_mask, cache)


def _set_column(x: tf.Tensor, column: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """x [R, C] with column `column` set to `values` [R]."""
    return dynamic_update_slice(x, tf.cast(values[:, None], x.dtype), [0, column])


def _dims(ids: tf.Tensor) -> tuple[Any, Any]:
    """(B, T): Python ints when the trace knows them, else tensors (a shape-polymorphic export)."""
    dyn = tf.shape(ids)
    return (ids.shape[0] if ids.shape[0] is not None else dyn[0], ids.shape[1] if ids.shape[1] is not None else dyn[1])


def prefill(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, total: int
) -> tuple[tf.Tensor, StaticCache, tf.Tensor, tf.Tensor]:
    """Run the prompt into a fresh cache of `total` slots -> (last logits, cache, key mask [B, S],
    next position [B])."""
    b, t = _dims(ids)
    cache = init_cache(model.config, b, total, model.get_decoder().embed_tokens.dtype)
    key_mask = tf.pad(mask, [[0, 0], [0, total - t]])  # [B, S]; new slots are switched on as they fill
    positions = positions_from_mask(mask, 0, t)  # [B, T]
    logits, cache = _forward(model, ids, positions, key_mask, cache)
    return logits, cache, key_mask, tf.reduce_sum(mask, axis=1)


# ---------------------------------------------------------------- logits processors (Hugging Face order)
def _is_any(tokens: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    """bool, same shape as `tokens`: the token is one of `ids` [E] (int32; -1 entries match nothing)."""
    ids = tf.cast(ids, tokens.dtype)
    return tf.reduce_any(tf.equal(tokens[..., None], ids) & (ids >= 0), axis=-1)


def seen_tokens(tokens: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """bool [R, V]: which ids occur in each row of `tokens` [R, L]."""
    r, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
    rows = tf.repeat(tf.range(r), length)
    idx = tf.stack([rows, tf.reshape(tf.cast(tokens, tf.int32), [-1])], axis=1)
    hits = tf.tensor_scatter_nd_max(tf.zeros([r, vocab_size], tf.int32), idx, tf.ones([r * length], tf.int32))
    return hits > 0


def banned_ngram_tokens(tokens: tf.Tensor, length: tf.Tensor, n: int, vocab_size: int, first: Any = 0) -> tf.Tensor:
    """bool [R, V]: Hugging Face's no-repeat-n-gram bans for rows `tokens` [R, C] whose columns
    [first, length) hold the sequence: the ids that would repeat an n-gram already in the row."""
    r, c = tf.shape(tokens)[0], tokens.shape[1]
    windows = c - n + 1  # n-gram start columns
    if windows <= 0:
        return tf.zeros([r, vocab_size], tf.bool)
    last = tf.gather(tokens, tf.maximum(length - (n - 1) + tf.range(n - 1), 0), axis=1)  # [R, n-1]
    starts = tf.range(windows)
    match = tf.tile(((starts >= first) & (starts <= length - n))[None, :], [r, 1])  # [R, W] complete n-grams only
    for m in range(n - 1):
        match &= tf.equal(tokens[:, m : m + windows], last[:, m : m + 1])
    follow = tf.cast(tokens[:, n - 1 : n - 1 + windows], tf.int32)  # [R, W]: the n-gram's last token
    idx = tf.stack([tf.repeat(tf.range(r), windows), tf.reshape(follow, [-1])], axis=1)
    flags = tf.reshape(tf.cast(match, tf.int32), [-1])
    hits = tf.tensor_scatter_nd_max(tf.zeros([r, vocab_size], tf.int32), idx, flags)
    return hits > 0


def penalise_seen(logits: tf.Tensor, seen: tf.Tensor, penalty: tf.Tensor) -> tf.Tensor:
    """Hugging Face's repetition penalty on the ids marked in `seen` [R, V]: / penalty where > 0,
    * penalty where < 0."""
    return tf.where(seen, tf.where(logits < 0, logits * penalty, logits / penalty), logits)


def apply_repetition_penalty(logits: tf.Tensor, sequences: tf.Tensor, penalty: Any) -> tf.Tensor:
    """The repetition penalty over every id of `sequences` [R, L] (prompt and padding included)."""
    return penalise_seen(logits, seen_tokens(sequences, logits.shape[-1]), tf.cast(penalty, logits.dtype))


def apply_no_repeat_ngram(logits: tf.Tensor, sequences: tf.Tensor, ngram_size: int, length: Any = None,
                          first: Any = 0) -> tf.Tensor:
    """-inf on the ids that would repeat an `ngram_size`-gram of `sequences` [R, C] (columns
    [first, length); default all)."""
    length = sequences.shape[1] if length is None else length
    return tf.where(banned_ngram_tokens(sequences, length, ngram_size, logits.shape[-1], first), -INF, logits)


def apply_min_new_tokens(logits: tf.Tensor, step: Any, min_new_tokens: Any, eos_ids: Any) -> tf.Tensor:
    """-inf on the eos ids while `step` < `min_new_tokens` (step = tokens generated so far)."""
    is_eos = _is_any(tf.range(logits.shape[-1]), tf.constant(eos_ids, tf.int32) if isinstance(eos_ids, (list, tuple))
                     else eos_ids)  # [V]
    return tf.where(is_eos[None, :] & (step < min_new_tokens), -INF, logits)


def process_logits(logits: tf.Tensor, step: tf.Tensor, seen: tf.Tensor | None, sequences: tf.Tensor | None,
                   length: tf.Tensor, first: Any, eos_ids: tf.Tensor, repetition_penalty: tf.Tensor,
                   min_new_tokens: tf.Tensor, ngram: int, min_new: bool) -> tf.Tensor:
    """Hugging Face's processors in its order on logits [R, V] at generated step `step` (the same
    signature in opt_flax): repetition penalty over `seen` [R, V] (None = off), no-repeat
    `ngram`-grams over `sequences` [R, C] (columns [first, length) filled), then eos forbidden
    while fewer than `min_new_tokens` tokens are new (`min_new`)."""
    if seen is not None:
        logits = penalise_seen(logits, seen, repetition_penalty)
    if ngram:
        logits = apply_no_repeat_ngram(logits, sequences, ngram, length, first)
    if min_new:
        logits = apply_min_new_tokens(logits, step, min_new_tokens, eos_ids)
    return logits


def _process(logits: tf.Tensor, step: tf.Tensor, seen: tf.Tensor, sequences: tf.Tensor, length: tf.Tensor,
             v: Knobs, s: GenerationSettings) -> tf.Tensor:
    """`process_logits` with a loop's knobs and settings (its rows start at column 0: no bucket)."""
    return process_logits(logits, step, seen if s.repetition_penalty else None, sequences, length, 0, v.eos_ids,
                          v.repetition_penalty, v.min_new_tokens, s.no_repeat_ngram_size,
                          bool(s.min_new_tokens and s.num_eos))


# ---------------------------------------------------------------- logits warpers (Hugging Face order)
def apply_temperature(logits: tf.Tensor, temperature: Any) -> tf.Tensor:
    return logits / temperature


def apply_top_k(logits: tf.Tensor, top_k: int) -> tf.Tensor:
    """Keep entries >= the k-th largest (static k; 0 or >= V keeps everything); the rest -inf."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = tf.math.top_k(logits, k=top_k).values[:, -1:]  # [B, 1]
    return tf.where(logits < kth, -INF, logits)


def apply_top_p(logits: tf.Tensor, top_p: Any) -> tf.Tensor:
    """Nucleus filtering (1.0 = off): sort ascending, drop the tokens whose cumulative probability
    is <= 1 - top_p, always keep the most likely."""
    vocab = logits.shape[-1]
    order = tf.argsort(logits, axis=-1, direction="ASCENDING", stable=True)
    sorted_logits = tf.gather(logits, order, batch_dims=1)
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - top_p
    remove_sorted = tf.concat([remove_sorted[:, :-1], tf.zeros_like(remove_sorted[:, -1:])], axis=-1)
    remove = tf.scatter_nd(
        tf.stack([tf.repeat(tf.range(tf.shape(order)[0]), vocab), tf.reshape(order, [-1])], axis=1),
        tf.reshape(remove_sorted, [-1]),
        tf.shape(logits),
    )
    return tf.where(remove & (top_p < 1.0), -INF, logits)


def warp_logits(logits: tf.Tensor, temperature: Any, top_k: int, top_p: Any) -> tf.Tensor:
    """Temperature, then top-k (static k; 0 = off), then top-p (1.0 = off), as Hugging Face's
    warpers: removed tokens get -inf."""
    return apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)


def sample(logits: tf.Tensor, s: GenerationSettings, step: tf.Tensor, words: tf.Tensor, temperature: tf.Tensor,
           top_p: tf.Tensor) -> tf.Tensor:
    """The next token [B] (int32) from processed logits [B, V]: argmax, or Gumbel-max over the
    warped logits with the noise of `opt_core.sampling` for (seed, step, row)."""
    if not s.do_sample:
        return tf.argmax(logits, axis=-1, output_type=tf.int32)
    warped = warp_logits(logits, temperature, s.top_k, top_p)
    noise = gumbel_noise(words, step, tf.shape(logits)[0], logits.shape[-1])
    return tf.argmax(warped + noise, axis=-1, output_type=tf.int32)


# ---------------------------------------------------------------- streaming (host callback)
class _StreamSlot:
    """The streamer of the call in progress; the compiled graph calls `deliver` with each step's tokens."""

    def __init__(self) -> None:
        self.streamer: Any = None

    def deliver(self, tokens: np.ndarray) -> np.int32:
        if self.streamer is not None:
            self.streamer.put(np.asarray(tokens, np.int64))
        return np.int32(0)


def _stream_step(model: Any, tokens: tf.Tensor) -> tf.Tensor:
    """Send `tokens` [B] to the host streamer; returns an op to depend on."""
    slot = model.__dict__.setdefault("_opt_stream_slot", _StreamSlot())
    return tf.numpy_function(slot.deliver, [tf.cast(tokens, tf.int64)], tf.int32, stateful=True)


# ---------------------------------------------------------------- greedy and sampling
def greedy_or_sample_loop(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, limit: tf.Tensor, v: Knobs, s: GenerationSettings,
) -> tuple[tf.Tensor, tf.Tensor]:
    """-> (tokens [B, S] padded with the pad id, number of new columns produced (<= limit))."""
    b, t = _dims(ids)
    vocab = model.config.vocab_size
    n = tf.minimum(limit, s.total_length - t)
    logits, cache, key_mask, next_pos = prefill(model, ids, mask, s.total_length)
    tokens = tf.pad(ids, [[0, 0], [0, s.total_length - t]], constant_values=v.pad_token_id)  # [B, S]
    unfinished = tf.ones([b], tf.bool)
    seen = seen_tokens(ids, vocab) if s.repetition_penalty else tf.zeros([0], tf.bool)

    def body(i, tokens, key_mask, cache, logits, next_pos, unfinished, seen):
        logits = _process(logits, i, seen, tokens, t + i, v, s)
        nxt = sample(logits, s, i, v.seed, v.temperature, v.top_p)  # [B]
        nxt = tf.where(unfinished, nxt, v.pad_token_id)
        if s.stream:
            with tf.control_dependencies([_stream_step(model, nxt)]):
                nxt = tf.identity(nxt)
        tokens = _set_column(tokens, t + i, nxt)
        if s.num_eos:
            unfinished = unfinished & ~_is_any(nxt, v.eos_ids)
        if s.repetition_penalty:
            seen = seen | tf.equal(tf.range(vocab)[None, :], nxt[:, None])
        key_mask = _set_column(key_mask, t + i, tf.ones([b], key_mask.dtype))
        logits, cache = decode_one_token(model, nxt[:, None], next_pos[:, None], key_mask, cache)
        return i + 1, tokens, key_mask, cache, logits, next_pos + 1, unfinished, seen

    def cond(i, tokens, key_mask, cache, logits, next_pos, unfinished, seen):
        return (i < n) & tf.reduce_any(unfinished)

    i, tokens, *_ = tf.while_loop(
        cond, body, (tf.constant(0), tokens, key_mask, cache, logits, next_pos, unfinished, seen),
    )
    return tokens, i


# ---------------------------------------------------------------- beam search
def _gather_beams(x: tf.Tensor, idx: tf.Tensor) -> tf.Tensor:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, K']."""
    return tf.gather(x, idx, axis=1, batch_dims=1)


class BeamState(NamedTuple):
    """Beam search's state between steps: opt_core.generation.BeamState's fields as tensors
    (running [B, K, S], running_scores [B, K], running_parents [B, K, N], the same three for the
    finished hypotheses, is_finished [B, K], improvable [B, 1])."""

    running: tf.Tensor
    running_scores: tf.Tensor
    running_parents: tf.Tensor
    finished: tf.Tensor
    finished_scores: tf.Tensor
    finished_parents: tf.Tensor
    is_finished: tf.Tensor
    improvable: tf.Tensor


class BeamLoop(NamedTuple):
    """What the beam search while-loop carries from one step to the next."""

    step: tf.Tensor  # int32: tokens generated so far
    state: BeamState
    cache: StaticCache  # B*K rows
    key_mask: tf.Tensor  # [B*K, S]
    logits: tf.Tensor  # [B*K, V] of the running beams' last tokens
    next_pos: tf.Tensor  # [B*K]
    seen: tf.Tensor  # [B*K, V] ids in each running beam (repetition penalty), else [0]
    go_on: tf.Tensor  # bool: Hugging Face's "beam search has unfinished sequences"


def beam_search_step(
    state: BeamState, log_probs: tf.Tensor, step: tf.Tensor, prompt_length: Any, max_length: Any, v: Knobs,
    s: GenerationSettings,
) -> tuple[BeamState, tf.Tensor, tf.Tensor]:
    """One step of Hugging Face 4.57's `_beam_search` (opt_core.generation.beam_search_step) on
    processed log-probs [B*K, V]; `max_length` = prompt + the new tokens allowed. Returns the new
    state, the flat row [B*K] each running beam continues (the cache reorder) and go-on (bool)."""
    b, k = tf.shape(state.running)[0], s.num_beams
    vocab = log_probs.shape[-1]
    cur_len = prompt_length + step
    keep = max(2, 1 + s.num_eos) * k  # K stay open even if the best all end here
    scores = tf.reshape(tf.reshape(log_probs, [b, k, vocab]) + state.running_scores[:, :, None], [b, k * vocab])
    top_scores, top = tf.math.top_k(scores, k=keep)  # [B, keep]
    parent, token = top // vocab, top % vocab
    cols = tf.range(tf.shape(state.running)[2])[None, None, :]
    top_running = tf.where(cols == cur_len, token[:, :, None], _gather_beams(state.running, parent))  # [B, keep, S]
    steps = tf.range(tf.shape(state.running_parents)[2])[None, None, :]
    flat_parent = parent + tf.range(b)[:, None] * k
    top_parents = tf.where(steps == step, flat_parent[:, :, None], _gather_beams(state.running_parents, parent))
    hits = tf.fill(tf.shape(token), cur_len + 1 >= max_length)  # max length: every candidate ends
    if s.num_eos:
        hits = hits | _is_any(token, v.eos_ids)

    # The best K candidates that did not end keep running.
    open_scores = top_scores + tf.cast(hits, tf.float32) * NEG
    nxt = tf.math.top_k(open_scores, k=k).indices
    running = _gather_beams(top_running, nxt)
    running_scores = _gather_beams(open_scores, nxt)
    running_parents = _gather_beams(top_parents, nxt)

    # Candidates that ended among the top K join the finished ones if they score higher.
    just_finished = hits & (tf.range(keep) < k)[None, :]
    done_scores = top_scores / tf.cast(cur_len + 1 - prompt_length, tf.float32) ** v.length_penalty
    full = tf.reduce_all(state.is_finished, axis=-1, keepdims=True) & (s.early_stopping is True)
    done_scores += tf.cast(full, tf.float32) * NEG
    done_scores += tf.cast(~state.improvable, tf.float32) * NEG
    done_scores += tf.cast(~just_finished, tf.float32) * NEG
    merged_scores = tf.concat([state.finished_scores, done_scores], axis=1)  # [B, K + keep]
    best = tf.math.top_k(merged_scores, k=k).indices
    finished = _gather_beams(tf.concat([state.finished, top_running], axis=1), best)
    finished_scores = _gather_beams(merged_scores, best)
    finished_parents = _gather_beams(tf.concat([state.finished_parents, top_parents], axis=1), best)
    is_finished = _gather_beams(tf.concat([state.is_finished, just_finished], axis=1), best)

    # Hugging Face's early-stop heuristic: can the best running beam still beat the worst finished?
    best_length = tf.cast(cur_len + 1 - prompt_length, tf.float32)
    if s.early_stopping == "never":
        best_length = tf.where(v.length_penalty > 0.0, tf.cast(max_length - prompt_length, tf.float32), best_length)
    best_running = running_scores[:, :1] / best_length**v.length_penalty
    worst_finished = tf.where(is_finished, tf.reduce_min(finished_scores, axis=1, keepdims=True), NEG)
    improvable = state.improvable & tf.reduce_any(best_running > worst_finished, axis=-1, keepdims=True)
    go_on = (tf.reduce_any(improvable) & ~(tf.reduce_all(is_finished) & (s.early_stopping is True))
             & ~tf.reduce_all(hits))
    rows = tf.reshape(running_parents[:, :, step], [-1])
    new = BeamState(running, running_scores, running_parents, finished, finished_scores, finished_parents,
                    is_finished, improvable)
    return new, rows, go_on


def beam_search_loop(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, limit: tf.Tensor, v: Knobs, s: GenerationSettings,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Hugging Face's beam search, equal to opt_core.generation.reference_beam_search: the prompt
    runs once, its cache is copied to the K beams. Returns (the best `num_return_sequences`
    sequences per prompt [B * n, S] filled with the pad knob, new columns kept)."""
    b, t = _dims(ids)
    k, cap = s.num_beams, s.total_length - t  # cap: new-token slots of the buffers
    max_length = t + tf.minimum(limit, cap)
    vocab = model.config.vocab_size
    logits, cache, key_mask, next_pos = prefill(model, ids, mask, s.total_length)
    beams = tf.repeat(tf.range(b), k)  # [B*K]: each beam's prompt row, beams of a row adjacent
    cache = cache.reorder(beams)
    seen = tf.gather(seen_tokens(ids, vocab), beams) if s.repetition_penalty else tf.zeros([0], tf.bool)

    running = tf.pad(tf.repeat(ids[:, None, :], k, axis=1), [[0, 0], [0, 0], [0, cap]],
                     constant_values=v.pad_token_id)  # [B, K, S]
    scores = tf.tile(tf.constant([[0.0] + [NEG] * (k - 1)]), [b, 1])  # only beam 0 is live at first
    parents = tf.fill([b, k, cap], -1)  # [B, K, N]
    state = BeamState(running, scores, parents, running, tf.fill([b, k], NEG), parents, tf.zeros([b, k], tf.bool),
                      tf.ones([b, 1], tf.bool))

    def body(c: BeamLoop) -> tuple[BeamLoop]:
        log_probs = tf.nn.log_softmax(c.logits, axis=-1)  # [B*K, V]
        rows_so_far = tf.reshape(c.state.running, [b * k, s.total_length])
        log_probs = _process(log_probs, c.step, c.seen, rows_so_far, t + c.step, v, s)
        state, rows, go_on = beam_search_step(c.state, log_probs, c.step, t, max_length, v, s)
        nxt = tf.reshape(state.running[:, :, t + c.step], [b * k])  # [B*K]
        seen = c.seen
        if s.repetition_penalty:
            seen = tf.gather(seen, rows) | tf.equal(tf.range(vocab)[None, :], nxt[:, None])
        key_mask = _set_column(c.key_mask, t + c.step, tf.ones([b * k], c.key_mask.dtype))
        logits, cache = decode_one_token(model, nxt[:, None], c.next_pos[:, None], key_mask, c.cache.reorder(rows))
        return (BeamLoop(c.step + 1, state, cache, key_mask, logits, c.next_pos + 1, seen, go_on),)

    def cond(c: BeamLoop) -> tf.Tensor:
        return (c.step < max_length - t) & c.go_on

    start = BeamLoop(tf.constant(0), state, cache, tf.repeat(key_mask, k, axis=0), tf.repeat(logits, k, axis=0),
                     tf.repeat(next_pos, k, axis=0), seen, tf.constant(True))
    (end,) = tf.while_loop(cond, body, (start,))
    n = s.num_return_sequences
    best = tf.reshape(end.state.finished[:, :n], [b * n, s.total_length])
    kept = tf.reshape(end.state.finished_parents[:, :n], [b * n, cap])
    generated = tf.reduce_max(tf.reduce_sum(tf.cast(kept >= 0, tf.int32), axis=1))
    return best, generated


# ---------------------------------------------------------------- contrastive search
def contrastive_choice(top_probs: tf.Tensor, context: tf.Tensor, context_mask: tf.Tensor, candidates: tf.Tensor,
                       penalty_alpha: tf.Tensor) -> tf.Tensor:
    """Which of the K candidates each row takes (opt_core.generation.contrastive_choice): the first
    argmax of (1 - alpha) * p - alpha * max cosine(candidate, an earlier real hidden state).
    top_probs [B, K]; context [B, S, E] with context_mask [B, S]; candidates [B, K, E] -> [B] int32."""
    def unit(x: tf.Tensor) -> tf.Tensor:
        return x / tf.norm(x, axis=-1, keepdims=True)  # HF divides by the norm, no epsilon

    cosine = tf.einsum("bse,bke->bks", unit(context), unit(candidates))  # [B, K, S]
    cosine = tf.where(context_mask[:, None, :] > 0, cosine, -INF)
    score = (1.0 - penalty_alpha) * top_probs - penalty_alpha * tf.reduce_max(cosine, axis=-1)
    return tf.argmax(score, axis=-1, output_type=tf.int32)


def contrastive_search_loop(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, limit: tf.Tensor, v: Knobs, s: GenerationSettings,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Contrastive search as Hugging Face 4.55, equal to opt_core.generation.reference_contrastive_search:
    the prompt runs once and its cache is copied to K rows per prompt; each step runs the top_k
    candidates one token ahead in those rows, keeps the one `contrastive_choice` picks and copies
    its row over the other K - 1. -> (tokens [B, S] padded with the pad id, new columns produced)."""
    b, t = _dims(ids)
    k, total = s.top_k, s.total_length
    vocab = model.config.vocab_size
    n = tf.minimum(limit, total - t)
    decoder = model.get_decoder()
    cache = init_cache(model.config, b, total, decoder.embed_tokens.dtype)
    key_mask = tf.pad(mask, [[0, 0], [0, total - t]])  # [B, S]; slots switch on as they fill
    out = decoder(ids, positions_from_mask(mask, 0, t), key_mask, past_key_values=cache, training=False)
    hidden = tf.cast(out.last_hidden_state, tf.float32)  # [B, T, E]
    logits = tf.cast(model.lm_logits(out.last_hidden_state[:, -1:])[:, 0], tf.float32)  # [B, V]
    context = tf.pad(hidden, [[0, 0], [0, total - t], [0, 0]])  # [B, S, E]: what candidates are held against
    cache = out.past_key_values.reorder(tf.repeat(tf.range(b), k))  # [B*K] rows
    next_pos = tf.repeat(tf.reduce_sum(mask, axis=1), k)  # [B*K]
    tokens = tf.pad(ids, [[0, 0], [0, total - t]], constant_values=v.pad_token_id)  # [B, S]
    seen = seen_tokens(ids, vocab) if s.repetition_penalty else tf.zeros([0], tf.bool)
    slots = tf.range(total)

    def body(i, tokens, key_mask, cache, logits, next_pos, unfinished, seen, context):
        processed = _process(logits, i, seen, tokens, t + i, v, s)
        top_probs, top_ids = tf.math.top_k(tf.nn.softmax(processed, axis=-1), k=k)  # [B, K]
        step_mask = _set_column(key_mask, t + i, tf.ones([b], key_mask.dtype))
        out = decoder(tf.reshape(top_ids, [-1, 1]), next_pos[:, None], tf.repeat(step_mask, k, axis=0),
                      past_key_values=cache, training=False)
        cand_hidden = tf.reshape(tf.cast(out.last_hidden_state[:, -1], tf.float32), [b, k, -1])  # [B, K, E]
        cand_logits = tf.cast(model.lm_logits(out.last_hidden_state[:, -1:])[:, 0], tf.float32)  # [B*K, V]
        choice = contrastive_choice(top_probs, context, key_mask, cand_hidden, v.penalty_alpha)  # [B]
        picked = tf.range(b) * k + choice
        cache = out.past_key_values.reorder(tf.repeat(picked, k))  # every row of a prompt continues from it
        chosen = tf.gather(cand_hidden, choice, batch_dims=1)  # [B, E]
        context = tf.where((slots == t + i)[None, :, None], chosen[:, None, :], context)
        nxt = tf.gather(top_ids, choice, batch_dims=1)
        nxt = tf.where(unfinished, nxt, v.pad_token_id)
        tokens = _set_column(tokens, t + i, nxt)
        if s.num_eos:
            unfinished = unfinished & ~_is_any(nxt, v.eos_ids)
        if s.repetition_penalty:
            seen = seen | tf.equal(tf.range(vocab)[None, :], nxt[:, None])
        return (i + 1, tokens, step_mask, cache, tf.gather(cand_logits, picked), next_pos + 1, unfinished, seen,
                context)

    def cond(i, tokens, key_mask, cache, logits, next_pos, unfinished, seen, context):
        return (i < n) & tf.reduce_any(unfinished)

    i, tokens, *_ = tf.while_loop(
        cond, body, (tf.constant(0), tokens, key_mask, cache, logits, next_pos, tf.ones([b], tf.bool), seen, context),
    )
    return tokens, i


# ---------------------------------------------------------------- compiled entry points
def compiled_generate_fn(model: Any, settings: GenerationSettings) -> tf.types.experimental.GenericFunction:
    """The compiled generation function of `model` for `settings` (built once, then reused).

    It takes (input_ids [B, T] int32, attention_mask [B, T] int32, max_new_tokens int32, the
    `Knobs` tensors as a tuple (`knobs`)) and returns (tokens [B, S] int32, new columns produced).
    Shapes may be unknown when traced (an exported signature): XLA then compiles once per concrete
    shape. XLA-compiled unless `settings.stream` (a host callback per step runs as a plain graph).
    """
    fns = model.__dict__.setdefault("_opt_generate_fns", {})
    if settings not in fns:
        def generate_fn(input_ids, attention_mask, max_new_tokens, knobs):
            knobs = Knobs(*knobs)
            if settings.num_beams > 1:
                return beam_search_loop(model, input_ids, attention_mask, max_new_tokens, knobs, settings)
            if settings.contrastive:
                return contrastive_search_loop(model, input_ids, attention_mask, max_new_tokens, knobs, settings)
            return greedy_or_sample_loop(model, input_ids, attention_mask, max_new_tokens, knobs, settings)

        fns[settings] = tf.function(generate_fn, jit_compile=not settings.stream, reduce_retracing=False)
    return fns[settings]


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
) -> tf.Tensor:
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
TF: the decode loop is one XLA-compiled `tf.while_loop` (compiled once per shape and mode); with a
streamer it runs as a plain graph with a host callback per step. Returns a tf.int64 tf.Tensor.
"""


def knobs(seed: int, temperature: float, top_p: float, repetition_penalty: float, min_new_tokens: int,
          eos_token_ids: tuple[int, ...], pad_token_id: int, length_penalty: float,
          penalty_alpha: float = 0.0) -> tuple[tf.Tensor, ...]:
    """The `Knobs` tensors of one call (a plain tuple: what the compiled function takes)."""
    return (
        tf.constant(seed_words(seed), tf.uint32), tf.constant(temperature, tf.float32), tf.constant(top_p, tf.float32),
        tf.constant(repetition_penalty, tf.float32), tf.constant(min_new_tokens, tf.int32),
        tf.constant(list(eos_token_ids) or [-1], tf.int32), tf.constant(pad_token_id, tf.int32),
        tf.constant(length_penalty, tf.float32), tf.constant(penalty_alpha, tf.float32),
    )


def run(model: Any, ids: np.ndarray, mask: np.ndarray, o: GenerationOptions) -> tf.Tensor:
    """Generate with resolved options `o` (`opt_core.generation_config.resolve_generation_options`)
    from checked inputs ids / mask [B, T]; returns tf.int64 [B, T + generated]."""
    streamer = o.streamer
    if o.num_beams == 1 and o.num_return_sequences > 1:  # samples: rows b * n + j, as Hugging Face
        ids, mask = np.repeat(ids, o.num_return_sequences, 0), np.repeat(mask, o.num_return_sequences, 0)
    if streamer is not None:
        streamer.put(ids.astype(np.int64))
    if o.max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return tf.constant(ids, tf.int64)
    settings = GenerationSettings(
        total_length=int(ids.shape[1] + o.max_new_tokens), do_sample=o.do_sample,
        top_k=o.top_k if o.do_sample or o.penalty_alpha > 0 else 0, num_beams=o.num_beams,
        num_eos=len(o.eos_token_ids), contrastive=o.penalty_alpha > 0,
        early_stopping=o.early_stopping, repetition_penalty=o.repetition_penalty != 1.0,
        no_repeat_ngram_size=o.no_repeat_ngram_size, min_new_tokens=o.min_new_tokens > 0,
        num_return_sequences=o.num_return_sequences if o.num_beams > 1 else 1, stream=streamer is not None,
    )
    # Beam search fills unfinished columns as Hugging Face does (pad or, for pad id 0, the first eos).
    fill = o.beam_fill_id if o.num_beams > 1 else o.pad_token_id
    fn = compiled_generate_fn(model, settings)
    slot = model.__dict__.setdefault("_opt_stream_slot", _StreamSlot())
    slot.streamer = streamer
    try:
        tokens, produced = fn(
            tf.constant(ids, tf.int32), tf.constant(mask, tf.int32), tf.constant(o.max_new_tokens, tf.int32),
            knobs(o.seed or 0, o.temperature, o.top_p, o.repetition_penalty, o.min_new_tokens, o.eos_token_ids,
                  fill, o.length_penalty, o.penalty_alpha),
        )
    finally:
        slot.streamer = None
    if streamer is not None:
        streamer.end()
    return tf.cast(tokens[:, : ids.shape[1] + int(produced)], tf.int64)
