"""Generation: greedy, sampling and beam search over a static KV cache, compiled once per shape.

Like gpt-fast, the pieces are small functions beside the model: `prefill` runs the prompt and fills
the cache; `greedy_or_sample_loop` and `beam_search_loop` run the whole decode loop inside one
`jax.lax.while_loop` (no Python per token). Each is a `jax.jit` with the model's `GraphDef` as a
static argument and its state as data, so a second `generate` with the same shapes reuses the
compiled code. Prompts are left-padded up to a multiple of `pad_to_multiple_of` (a shape bucket):
positions come from the mask, so the extra padding changes nothing but the compile cache key.

Semantics follow Hugging Face: finished rows are padded with `pad_token_id`; the output stops when
every row has finished (so it may be shorter than `max_new_tokens`); sampling applies temperature,
then top-k, then top-p; beam search is Hugging Face torch 4.57's vectorised beam search.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core.inputs import validate_generation_args, validate_inputs
from opt_flax.cache import KVCache

# How many times each jitted function has been traced (= compiled); the no-recompile test reads it.
COMPILATIONS: collections.Counter[str] = collections.Counter()
NEG = -1.0e9  # Hugging Face's "impossible" beam score
FILTERED = float(np.finfo(np.float32).min)  # logits removed by top-k / top-p (finite, never -inf)


def compilation_count(name: str | None = None) -> int:
    """Traces so far of one jitted generation function (or of all of them)."""
    return COMPILATIONS[name] if name is not None else sum(COMPILATIONS.values())


# ---------------------------------------------------------------- jitted steps
@functools.partial(jax.jit, static_argnames=("graphdef", "max_length"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
            max_length: int) -> tuple[jax.Array, KVCache]:
    """Run the prompt [B, P] through a fresh cache of `max_length` slots.

    attention_mask is [B, max_length]: the prompt's mask, then ones for the tokens to come.
    Returns the last position's logits [B, V] (float32) and the filled cache.
    """
    COMPILATIONS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, input_ids.shape[0], max_length, model.dtype)
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1, validate=False)
    return out.logits[:, -1].astype(jnp.float32), out.past_key_values


def _decode_step(model: Any, tokens: jax.Array, attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row [B] -> next logits [B, V] (float32) and the cache with it written."""
    out = model(tokens[:, None], attention_mask=attention_mask, past_key_values=cache, validate=False)
    return out.logits[:, -1].astype(jnp.float32), out.past_key_values


def _to_carry(cache: KVCache) -> KVCache:
    """The cache as a while loop carries it: a batch of one drops its batch axis ([N, S, H]).

    With a [1, N, S, H] carry, XLA CPU copied every key/value buffer twice per decode step: the
    attention einsums drop the size-1 batch axis, the fused in-place update then ends in a reshape,
    and copy insertion gives up on updating in place. At 2048 slots that is ~300 MB per token for
    opt-125m. Carried without the axis, the update stays in place; larger batches already do."""
    if cache.batch_size != 1:
        return cache
    return KVCache(tuple(k[0] for k in cache.keys), tuple(v[0] for v in cache.values), cache.length)


def _from_carry(carried: KVCache, batch: int) -> KVCache:
    """Inverse of `_to_carry` for a batch of `batch` rows."""
    if batch != 1:
        return carried
    return KVCache(tuple(k[None] for k in carried.keys), tuple(v[None] for v in carried.values), carried.length)


def warp_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k (0 = off), then top-p (1.0 = off), as Hugging Face's warpers do.
    logits [B, V] float32; removed entries get a large finite negative."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V]
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.full((logits.shape[0], 1), k - 1), axis=-1)  # [B, 1]
    logits = jnp.where((top_k > 0) & (logits < kth), FILTERED, logits)
    # top-p: drop the smallest tokens whose cumulative probability stays <= 1 - top_p (keep >= 1).
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_asc = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where((top_p < 1.0) & remove, FILTERED, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample"))
def greedy_or_sample_loop(graphdef: nnx.GraphDef, state: nnx.State, first_logits: jax.Array, cache: KVCache,
                          attention_mask: jax.Array, max_new_tokens: int, do_sample: bool, eos_token_id: jax.Array,
                          pad_token_id: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                          top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Decode up to `max_new_tokens` tokens per row inside one while_loop.

    Returns the new tokens [B, max_new_tokens] (pad after a row finished) and the number of steps
    taken (the loop stops early once every row has produced `eos_token_id`; eos < 0 disables it).
    """
    COMPILATIONS["greedy_or_sample_loop"] += 1
    model = nnx.merge(graphdef, state)
    b = first_logits.shape[0]

    def cond(carry: tuple) -> jax.Array:
        step, _, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry: tuple) -> tuple:
        step, tokens, logits, carried, finished, key = carry
        if do_sample:
            key, sub = jax.random.split(key)
            nxt = jax.random.categorical(sub, warp_logits(logits, temperature, top_k, top_p), axis=-1)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt = jnp.where(finished, pad_token_id, nxt).astype(jnp.int32)  # [B]
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        finished = finished | (nxt == eos_token_id)
        logits, cache = _decode_step(model, nxt, attention_mask, _from_carry(carried, b))
        return step + 1, tokens, logits, _to_carry(cache), finished, key

    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    carry = (jnp.int32(0), tokens, first_logits, _to_carry(cache), jnp.zeros((b,), bool), key)
    step, tokens, *_ = jax.lax.while_loop(cond, body, carry)
    return tokens, step


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_beams", "early_stopping"))
def beam_search_loop(graphdef: nnx.GraphDef, state: nnx.State, first_logits: jax.Array, cache: KVCache,
                     attention_mask: jax.Array, max_new_tokens: int, num_beams: int, early_stopping: bool | str,
                     eos_token_id: jax.Array, pad_token_id: jax.Array, length_penalty: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Hugging Face torch's vectorised beam search (4.57), one while_loop.

    first_logits [B, V] and cache/attention_mask with B rows (the prompt is prefilled once per row
    and copied to its beams here). Returns the best sequence's new tokens [B, max_new_tokens]
    (pad-filled) and the number of new tokens the output keeps (Hugging Face's trimmed length).
    """
    COMPILATIONS["beam_search_loop"] += 1
    model = nnx.merge(graphdef, state)
    b, vocab = first_logits.shape
    k, n = num_beams, max_new_tokens
    w = 2 * k  # beams_to_keep = max(2, 1 + number of eos ids) * num_beams, with one eos id
    top_num_beam_mask = jnp.arange(w) < k  # [W]

    # Every beam starts from its row's prompt: repeat rows (B -> B*K, beams of a row adjacent).
    cache = cache.reorder(jnp.repeat(jnp.arange(b), k))
    mask = jnp.repeat(attention_mask, k, axis=0)  # [B*K, S]
    logits = jnp.repeat(first_logits, k, axis=0)  # [B*K, V]

    def gather(x: jax.Array, idx: jax.Array) -> jax.Array:  # x [B, W or K, ...], idx [B, J]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(c: dict) -> jax.Array:
        return (c["step"] < n) & c["go"]

    def body(c: dict) -> dict:
        i = c["step"]
        log_probs = jax.nn.log_softmax(c["logits"], axis=-1).reshape(b, k, vocab)
        log_probs = (log_probs + c["run_scores"][:, :, None]).reshape(b, k * vocab)  # [B, K*V]
        topk_scores, topk_idx = jax.lax.top_k(log_probs, w)  # [B, W]
        parent = topk_idx // vocab
        tok = (topk_idx % vocab).astype(jnp.int32)
        topk_seqs = gather(c["run_seqs"], parent)  # [B, W, N]
        topk_seqs = jax.lax.dynamic_update_slice(topk_seqs, tok[:, :, None], (0, 0, i))
        hits = (tok == eos_token_id) | (i + 1 >= n)  # eos or max length reached

        # Running beams for the next step: the best K continuations that did not stop.
        run_cand = topk_scores + hits.astype(jnp.float32) * NEG
        _, nidx = jax.lax.top_k(run_cand, k)  # [B, K]
        run_seqs = gather(topk_seqs, nidx)
        run_scores = gather(run_cand, nidx)
        run_parent = gather(parent, nidx)  # [B, K]

        # Finished hypotheses: merge the top-K continuations that stopped, length-normalised.
        did_finish = hits & top_num_beam_mask[None, :]
        fin_cand = topk_scores / ((i + 1).astype(jnp.float32) ** length_penalty)
        full = jnp.all(c["is_fin"], axis=-1, keepdims=True) & (early_stopping is True)
        fin_cand = fin_cand + full * NEG + (~c["unsat"]) * NEG + (~did_finish) * NEG
        merged_scores = jnp.concatenate([c["fin_scores"], fin_cand], axis=1)  # [B, K + W]
        _, midx = jax.lax.top_k(merged_scores, k)
        fin_seqs = gather(jnp.concatenate([c["fin_seqs"], topk_seqs], axis=1), midx)
        fin_scores = gather(merged_scores, midx)
        is_fin = gather(jnp.concatenate([c["is_fin"], did_finish], axis=1), midx)
        fin_len = gather(jnp.concatenate([c["fin_len"], jnp.full((b, w), i + 1)], axis=1), midx)

        # Early-stop heuristic (Hugging Face's `_check_early_stop_heuristic`).
        if early_stopping == "never":
            best_len = jnp.where(length_penalty > 0.0, n, i + 1).astype(jnp.float32)
        else:
            best_len = (i + 1).astype(jnp.float32)
        best_running = run_scores[:, :1] / best_len**length_penalty
        worst_fin = jnp.where(is_fin, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
        unsat = c["unsat"] & jnp.any(best_running > worst_fin, axis=-1, keepdims=True)
        go = jnp.any(unsat) & ~(jnp.all(is_fin) & (early_stopping is True)) & ~jnp.all(hits)

        # Each surviving beam continues from its parent's cache.
        rows = (jnp.arange(b)[:, None] * k + run_parent).reshape(-1)  # [B*K]
        cache = c["cache"].reorder(rows)
        new_tok = run_seqs[:, :, i].reshape(-1)  # [B*K]
        logits, cache = _decode_step(model, new_tok, mask, cache)
        return dict(step=i + 1, go=go, logits=logits, cache=cache, run_seqs=run_seqs, run_scores=run_scores,
                    fin_seqs=fin_seqs, fin_scores=fin_scores, is_fin=is_fin, fin_len=fin_len, unsat=unsat)

    seqs0 = jnp.full((b, k, n), pad_token_id, jnp.int32)
    carry = dict(
        step=jnp.int32(0), go=jnp.bool_(True), logits=logits, cache=cache, run_seqs=seqs0,
        run_scores=jnp.where(jnp.arange(k)[None, :] == 0, 0.0, NEG) * jnp.ones((b, 1)),
        fin_seqs=seqs0, fin_scores=jnp.full((b, k), NEG), is_fin=jnp.zeros((b, k), bool),
        fin_len=jnp.zeros((b, k), jnp.int32), unsat=jnp.ones((b, 1), bool),
    )
    c = jax.lax.while_loop(cond, body, carry)
    return c["fin_seqs"][:, 0], jnp.max(c["fin_len"][:, 0])


# ---------------------------------------------------------------- the public entry point
def _bucket(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple if multiple > 1 else length


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    prng_key: jax.Array | None = None,
    seed: int | None = None,
    pad_to_multiple_of: int = 8,
) -> jax.Array:
    """Continue each row of `input_ids` [B, T] (left-padded when `attention_mask` has zeros).

    Args:
        max_new_tokens: tokens to add per row (the output stops earlier once every row hit eos).
        do_sample: sample (with `temperature`, `top_k` (0 = off), `top_p`) instead of greedy.
        num_beams: > 1 for beam search (deterministic; `length_penalty`, `early_stopping` as in HF).
        eos_token_id / pad_token_id: default to the config's; eos None disables stopping.
        prng_key: `jax.random.key` for sampling; or `seed` (an int, as in opt_torch); default key 0.
        pad_to_multiple_of: prompt widths are left-padded up to this multiple (compile buckets).
    Returns:
        int32 [B, T + generated]: the prompt followed by the new tokens (pad after a row's eos).
    Raises:
        ValueError: bad inputs, or a prompt plus new tokens longer than max_position_embeddings.
    """
    cfg = model.config
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    validate_inputs(ids, mask, cfg)
    validate_generation_args(
        cfg, ids.shape[1], max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature, top_p=top_p,
    )
    b, t = ids.shape
    width = min(_bucket(t, pad_to_multiple_of), cfg.max_position_embeddings - max_new_tokens)
    width = max(width, t)
    if width + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {t} tokens plus max_new_tokens={max_new_tokens} exceeds max_position_embeddings "
            f"({cfg.max_position_embeddings}); shorten the prompt or generate fewer tokens"
        )
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    eos = -1 if eos is None else eos

    extra = width - t  # left padding added for the shape bucket
    ids_b = np.concatenate([np.full((b, extra), pad, ids.dtype), ids], axis=1).astype(np.int32)
    mask_full = np.concatenate([np.zeros((b, extra), np.int32), mask.astype(np.int32),
                                np.ones((b, max_new_tokens), np.int32)], axis=1)  # [B, S]
    graphdef, state = nnx.split(model)
    max_length = width + max_new_tokens
    logits, cache = prefill(graphdef, state, jnp.asarray(ids_b), jnp.asarray(mask_full), max_length)
    if num_beams > 1:
        new, count = beam_search_loop(graphdef, state, logits, cache, jnp.asarray(mask_full), max_new_tokens,
                                      num_beams, early_stopping, jnp.int32(eos), jnp.int32(pad),
                                      jnp.float32(length_penalty))
    else:
        key = prng_key if prng_key is not None else jax.random.key(0 if seed is None else seed)
        new, count = greedy_or_sample_loop(graphdef, state, logits, cache, jnp.asarray(mask_full), max_new_tokens,
                                           do_sample, jnp.int32(eos), jnp.int32(pad), key,
                                           jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    count = int(count)
    return jnp.concatenate([jnp.asarray(ids, jnp.int32), new[:, :count]], axis=1)
