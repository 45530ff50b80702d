"""Generation for `OPTForCausalLM`: greedy, sampling and beam search, each one XLA-compiled function.

The whole decode loop is a `tf.while_loop` inside `tf.function(jit_compile=True)`: the prompt is
run once into a static cache (`opt_tf.cache`), then each step picks the next tokens and runs them.
Compiled functions are kept per model and per static setting (shape-independent arguments such as
temperature, top_p and the seed are tensors), so a second call with the same shapes does not retrace.

Semantics follow Hugging Face 4.57.6 (torch): finished rows are padded with the pad id and the
loop stops when every row has finished; sampling applies temperature, then top-k, then top-p;
beam search is Hugging Face's vectorised beam search (length penalty, early stopping).

Letters in shape comments: B batch, K beams, T prompt, N max new tokens, S = T + N, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

from opt_core.inputs import validate_generation_args, validate_inputs
from opt_tf.cache import StaticCache, init_cache
from opt_tf.modeling import positions_from_mask

NEG = -1.0e9  # Hugging Face's "impossible" score in beam search


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the compiled graph (shapes aside): one compiled function each."""

    total_length: int  # S: slots of the static cache (prompt + new tokens)
    do_sample: bool = False
    top_k: int = 50
    num_beams: int = 1
    eos_token_id: int | None = 2
    pad_token_id: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False


# ---------------------------------------------------------------- model steps (graph code)
def _run(
    model: Any, ids: tf.Tensor, positions: tf.Tensor, key_mask: tf.Tensor, cache: StaticCache
) -> tuple[tf.Tensor, StaticCache]:
    """New tokens [B, t] -> logits of the last one [B, V] (float32) and the advanced cache."""
    out = model.get_decoder()(ids, positions, key_mask, past_key_values=cache, training=False)
    logits = model.lm_logits(out.last_hidden_state[:, -1:])[:, 0]  # [B, V]
    return tf.cast(logits, tf.float32), out.past_key_values


def _set_column(x: tf.Tensor, column: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """x [R, C] with column `column` set to `values` [R]."""
    return dynamic_update_slice(x, tf.cast(values[:, None], x.dtype), [0, column])


def _dims(ids: tf.Tensor) -> tuple[Any, Any]:
    """(B, T): Python ints when the trace knows them, else tensors (a shape-polymorphic export)."""
    dyn = tf.shape(ids)
    return (ids.shape[0] if ids.shape[0] is not None else dyn[0], ids.shape[1] if ids.shape[1] is not None else dyn[1])


def _prefill(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, total: int
) -> tuple[tf.Tensor, StaticCache, tf.Tensor, tf.Tensor]:
    """Run the prompt into a fresh cache of `total` slots -> (last logits, cache, key mask [B, S],
    next position [B])."""
    b, t = _dims(ids)
    cache = init_cache(model.config, b, total, model.get_decoder().embed_tokens.dtype)
    key_mask = tf.pad(mask, [[0, 0], [0, total - t]])  # [B, S]; new slots are switched on as they fill
    logits, cache = _run(model, ids, positions_from_mask(mask, 0, t), key_mask, cache)
    return logits, cache, key_mask, tf.reduce_sum(mask, axis=1)


# ---------------------------------------------------------------- logits warpers (Hugging Face order)
def warp_logits(logits: tf.Tensor, temperature: tf.Tensor, top_k: int, top_p: tf.Tensor) -> tf.Tensor:
    """Temperature, then top-k (static k; 0 = off), then top-p (nucleus; 1.0 = off), as Hugging
    Face's warpers: removed tokens get -inf."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = tf.math.top_k(logits, k=top_k).values[:, -1:]  # [B, 1]
        logits = tf.where(logits < kth, -np.inf, logits)
    # Top-p: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, keep >= 1.
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
    return tf.where(remove, -np.inf, logits)


# ---------------------------------------------------------------- greedy and sampling
def _sample_loop(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, limit: tf.Tensor, seed: tf.Tensor, temperature: tf.Tensor,
    top_p: tf.Tensor, s: GenerationSettings,
) -> tuple[tf.Tensor, tf.Tensor]:
    """-> (tokens [B, S] padded with the pad id, number of new columns produced (<= limit))."""
    b, t = _dims(ids)
    n = tf.minimum(limit, s.total_length - t)
    logits, cache, key_mask, next_pos = _prefill(model, ids, mask, s.total_length)
    tokens = tf.pad(ids, [[0, 0], [0, s.total_length - t]], constant_values=s.pad_token_id)  # [B, S]
    unfinished = tf.ones([b], tf.bool)

    def pick(logits: tf.Tensor, i: tf.Tensor) -> tf.Tensor:
        if not s.do_sample:
            return tf.argmax(logits, axis=-1, output_type=tf.int32)
        warped = warp_logits(logits, temperature, s.top_k, top_p)
        step_seed = tf.stack([seed, tf.cast(i, seed.dtype)])
        return tf.cast(tf.random.stateless_categorical(warped, 1, step_seed)[:, 0], tf.int32)

    def body(i, tokens, key_mask, cache, logits, next_pos, unfinished):
        nxt = pick(logits, i)  # [B]
        nxt = tf.where(unfinished, nxt, s.pad_token_id)
        tokens = _set_column(tokens, t + i, nxt)
        if s.eos_token_id is not None:
            unfinished = unfinished & tf.not_equal(nxt, s.eos_token_id)
        key_mask = _set_column(key_mask, t + i, tf.ones([b], key_mask.dtype))
        logits, cache = _run(model, nxt[:, None], next_pos[:, None], key_mask, cache)
        return i + 1, tokens, key_mask, cache, logits, next_pos + 1, unfinished

    def cond(i, tokens, key_mask, cache, logits, next_pos, unfinished):
        return (i < n) & tf.reduce_any(unfinished)

    i, tokens, *_ = tf.while_loop(
        cond, body, (tf.constant(0), tokens, key_mask, cache, logits, next_pos, unfinished),
    )
    return tokens, i


# ---------------------------------------------------------------- beam search
def _gather_beams(x: tf.Tensor, idx: tf.Tensor) -> tf.Tensor:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, K']."""
    return tf.gather(x, idx, axis=1, batch_dims=1)


def _beam_loop(
    model: Any, ids: tf.Tensor, mask: tf.Tensor, limit: tf.Tensor, s: GenerationSettings
) -> tuple[tf.Tensor, tf.Tensor]:
    """Hugging Face's vectorised beam search -> (best sequence per row [B, S], new columns)."""
    b, t = _dims(ids)
    k, cap = s.num_beams, s.total_length - t  # cap: new-token slots of the buffers
    n = tf.minimum(limit, cap)
    max_length = t + n
    vocab = model.config.vocab_size
    keep = max(2, 1 + (1 if s.eos_token_id is not None else 0)) * k  # candidates per step
    top_num_beam_mask = tf.constant([True] * k + [False] * (keep - k))  # [2K]
    early_true = s.early_stopping is True

    flat_ids = tf.repeat(ids, k, axis=0)  # [B*K, T]
    flat_mask = tf.repeat(mask, k, axis=0)
    logits, cache, key_mask, next_pos = _prefill(model, flat_ids, flat_mask, s.total_length)

    running_sequences = tf.pad(tf.reshape(flat_ids, [b, k, t]), [[0, 0], [0, 0], [0, cap]],
                               constant_values=s.pad_token_id)  # [B, K, S]
    sequences = running_sequences
    running_scores = tf.tile(tf.constant([[0.0] + [NEG] * (k - 1)]), [b, 1])  # [B, K]
    beam_scores = tf.fill([b, k], NEG)
    is_sent_finished = tf.zeros([b, k], tf.bool)
    early_unsat = tf.ones([b, 1], tf.bool)
    running_beam_indices = tf.fill([b, k, cap], -1)  # [B, K, N]
    beam_indices = running_beam_indices
    batch_offset = tf.range(b)[:, None] * k  # [B, 1]
    cols_s = tf.range(s.total_length)[None, None, :]
    cols_n = tf.range(cap)[None, None, :]

    def body(i, running_sequences, sequences, running_scores, beam_scores, is_sent_finished, early_unsat,
             running_beam_indices, beam_indices, cache, key_mask, logits, next_pos, go_on):
        cur_len = t + i
        log_probs = tf.nn.log_softmax(logits, axis=-1)  # [B*K, V]
        log_probs = tf.reshape(log_probs, [b, k, vocab]) + running_scores[:, :, None]
        log_probs = tf.reshape(log_probs, [b, k * vocab])
        topk_log_probs, topk_indices = tf.math.top_k(log_probs, k=keep)  # [B, 2K]
        topk_beam = topk_indices // vocab
        topk_ids = topk_indices % vocab
        topk_sequences = _gather_beams(running_sequences, topk_beam)  # [B, 2K, S]
        topk_sequences = tf.where(cols_s == cur_len, topk_ids[:, :, None], topk_sequences)
        topk_beam_indices = _gather_beams(running_beam_indices, topk_beam)  # [B, 2K, N]
        topk_beam_indices = tf.where(cols_n == i, (topk_beam + batch_offset)[:, :, None], topk_beam_indices)

        hits = tf.fill([b, keep], cur_len + 1 >= max_length)  # max-length criterion
        if s.eos_token_id is not None:
            hits = hits | tf.equal(topk_ids, s.eos_token_id)

        # The best K continuations that did not stop keep running.
        topk_running = topk_log_probs + tf.cast(hits, tf.float32) * NEG
        next_idx = tf.math.top_k(topk_running, k=k).indices  # [B, K]
        running_sequences = _gather_beams(topk_sequences, next_idx)
        running_scores = _gather_beams(topk_running, next_idx)
        running_beam_indices = _gather_beams(topk_beam_indices, next_idx)

        # Continuations that stopped among the top K join the finished beams if they score higher.
        just_finished = hits & top_num_beam_mask[None, :]
        scores = topk_log_probs / (tf.cast(cur_len + 1 - t, tf.float32) ** s.length_penalty)
        full = tf.reduce_all(is_sent_finished, axis=-1, keepdims=True) & early_true
        scores += tf.cast(full, tf.float32) * NEG
        scores += tf.cast(~early_unsat, tf.float32) * NEG
        scores += tf.cast(~just_finished, tf.float32) * NEG
        merged_scores = tf.concat([beam_scores, scores], axis=1)  # [B, 3K]
        best = tf.math.top_k(merged_scores, k=k).indices
        sequences = _gather_beams(tf.concat([sequences, topk_sequences], axis=1), best)
        beam_scores = _gather_beams(merged_scores, best)
        beam_indices = _gather_beams(tf.concat([beam_indices, topk_beam_indices], axis=1), best)
        is_sent_finished = _gather_beams(tf.concat([is_sent_finished, just_finished], axis=1), best)

        cache = cache.reorder(tf.reshape(running_beam_indices[:, :, i], [b * k]))
        cur_len = cur_len + 1
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            best_len = tf.cast(max_length - t, tf.float32)
        else:
            best_len = tf.cast(cur_len - t, tf.float32)
        best_running = running_scores[:, :1] / best_len**s.length_penalty
        worst_finished = tf.where(is_sent_finished, tf.reduce_min(beam_scores, axis=1, keepdims=True), NEG)
        early_unsat = early_unsat & tf.reduce_any(best_running > worst_finished, axis=-1, keepdims=True)
        go_on = (
            tf.reduce_any(early_unsat)
            & ~(tf.reduce_all(is_sent_finished) & early_true)
            & ~tf.reduce_all(hits)
        )

        nxt = tf.reshape(running_sequences[:, :, t + i], [b * k])  # [B*K]
        key_mask = _set_column(key_mask, t + i, tf.ones([b * k], key_mask.dtype))
        logits, cache = _run(model, nxt[:, None], next_pos[:, None], key_mask, cache)
        return (i + 1, running_sequences, sequences, running_scores, beam_scores, is_sent_finished, early_unsat,
                running_beam_indices, beam_indices, cache, key_mask, logits, next_pos + 1, go_on)

    def cond(i, *state):
        return (i < n) & state[-1]

    state = tf.while_loop(
        cond, body,
        (tf.constant(0), running_sequences, sequences, running_scores, beam_scores, is_sent_finished, early_unsat,
         running_beam_indices, beam_indices, cache, key_mask, logits, next_pos, tf.constant(True)),
    )
    sequences, beam_indices = state[2], state[8]
    best = sequences[:, 0]  # [B, S]
    generated = tf.reduce_max(tf.reduce_sum(tf.cast(beam_indices[:, 0] >= 0, tf.int32), axis=1))
    return best, generated


# ---------------------------------------------------------------- compiled entry points
def compiled_generate_fn(model: Any, settings: GenerationSettings) -> tf.types.experimental.GenericFunction:
    """The XLA-compiled generation function of `model` for `settings` (built once, then reused).

    It takes (input_ids [B, T] int32, attention_mask [B, T] int32, max_new_tokens int32, seed int32,
    temperature float32, top_p float32) and returns (tokens [B, S], new columns produced). Shapes may
    be unknown when traced (an exported signature): XLA then compiles once per concrete shape.
    """
    fns = model.__dict__.setdefault("_opt_generate_fns", {})
    if settings not in fns:
        def generate_fn(input_ids, attention_mask, max_new_tokens, seed, temperature, top_p):
            if settings.num_beams > 1:
                return _beam_loop(model, input_ids, attention_mask, max_new_tokens, settings)
            return _sample_loop(model, input_ids, attention_mask, max_new_tokens, seed, temperature, top_p, settings)

        fns[settings] = tf.function(generate_fn, jit_compile=True, reduce_retracing=False)
    return fns[settings]


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_beams: int = 1,
    seed: int | None = None,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = -1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> tf.Tensor:
    """Continue `input_ids` [B, T] (left-padded when rows differ in length) by up to
    `max_new_tokens` tokens under XLA.

    Args:
        attention_mask: [B, T] 0/1 (default: all ones).
        do_sample: sample (temperature, top_k (0 = off), top_p) instead of greedy; `seed` makes it
            reproducible (None: a fresh random seed).
        num_beams: > 1 for beam search (with `length_penalty`, `early_stopping` as Hugging Face).
        eos_token_id / pad_token_id: -1 (default) takes them from the config; a row that emitted eos is padded with
            the pad id, and generation stops early when every row is done.
    Returns:
        int32 tf.Tensor [B, T + generated] (prompt included); `generated` <= max_new_tokens.
    Raises:
        ValueError: bad inputs or settings (named).
    """
    cfg = model.config
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    validate_inputs(ids, mask, cfg)
    validate_generation_args(
        cfg, ids.shape[1], max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature, top_p=top_p,
    )
    eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    pad = cfg.pad_token_id if pad_token_id == -1 else pad_token_id
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
    if pad is None:
        pad = eos if eos is not None else 0  # Hugging Face pads with eos when there is no pad id
    settings = GenerationSettings(
        total_length=int(ids.shape[1] + max_new_tokens), do_sample=bool(do_sample),
        top_k=int(top_k) if do_sample else 0,
        num_beams=int(num_beams), eos_token_id=eos, pad_token_id=int(pad), length_penalty=float(length_penalty),
        early_stopping=early_stopping,
    )
    fn = compiled_generate_fn(model, settings)
    tokens, produced = fn(
        tf.constant(ids, tf.int32), tf.constant(mask, tf.int32), tf.constant(max_new_tokens, tf.int32),
        tf.constant(seed, tf.int32),
        tf.constant(temperature, tf.float32), tf.constant(top_p, tf.float32),
    )
    return tokens[:, : ids.shape[1] + int(produced)]
