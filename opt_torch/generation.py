"""Text generation for `OPTForCausalLM`: small functions beside the model, not inside it.

    prefill(model, ids, mask, cache)            -> last-position logits [B, V] (float32)
    decode_one_token(model, tok, pos, mask, cache) -> logits [B, V]
    process_logits(...) / sample(...)           -> the next token [B]
    generate(model, ids, ...)                   -> [B, prompt + generated], prompt included

Greedy and beam search follow Hugging Face transformers 4.57 step for step (same stopping rules,
same length penalty, finished rows padded with pad_token_id), so their tokens are identical on the
same weights. The TF and Flax backends mirror these functions.

Letters in shape comments: B batch, K beams or candidates, T tokens, V vocab, E hidden width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opt_core.inputs import validate_generation_args, validate_inputs
from opt_torch.cache import Cache, DynamicCache, StaticCache

Streamer = Callable[[torch.Tensor], None]


# ---------------------------------------------------------------- model steps
def prefill(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, Any]:
    """Run the whole prompt [B, T] through the model, filling `cache`.

    Returns the float32 logits of the last position [B, V] and the model output.
    """
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
        logits_to_keep=0 if output_hidden_states else 1, output_hidden_states=output_hidden_states, validate=False,
    )
    return out.logits[:, -1].float(), out


def decode_one_token(
    model: Any, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    cache: Cache, output_hidden_states: bool = False,
) -> tuple[torch.Tensor, Any]:
    """One step: `tokens` [B, 1] at `position_ids` [B, 1] over the cache; `attention_mask` [B, S]
    or None when no row has padding. Returns float32 logits [B, V] and the model output."""
    out = model(
        input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
        use_cache=True, output_hidden_states=output_hidden_states, validate=False,
    )
    return out.logits[:, -1].float(), out


def process_logits(
    logits: torch.Tensor,
    sequences: torch.Tensor,
    repetition_penalty: float = 1.0,
    new_tokens: int = 0,
    min_new_tokens: int = 0,
    eos_token_ids: list[int] | None = None,
) -> torch.Tensor:
    """Hugging Face's logits processors, in its order: repetition penalty over every id in
    `sequences` [B, T] (prompt included), then eos forbidden before `min_new_tokens`."""
    if repetition_penalty != 1.0:
        score = torch.gather(logits, 1, sequences)
        score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
        logits = logits.scatter(1, sequences, score)
    if eos_token_ids and new_tokens < min_new_tokens:
        logits = logits.clone()
        logits[:, eos_token_ids] = -float("inf")
    return logits


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering, as Hugging Face's warpers."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, -float("inf"))
    return logits


def sample(
    logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [B] from processed logits [B, V]: argmax, or a draw after warping."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ---------------------------------------------------------------- the public entry point
def _eos_list(eos: int | list[int] | None) -> list[int]:
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _emit(streamer: Any, tokens: torch.Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)


@torch.inference_mode()
def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    penalty_alpha: float | None = None,
    eos_token_id: int | list[int] | None = -1,
    pad_token_id: int | None = -1,
    min_new_tokens: int = 0,
    streamer: Streamer | Any = None,
    cache_implementation: str = "static",
) -> torch.Tensor:
    """Continue each row of `input_ids` [B, T] (left-padded batches welcome).

    Args:
        attention_mask: [B, T] 0/1 (default: all real tokens).
        max_new_tokens: tokens to add at most; fewer when every row has hit eos.
        do_sample, temperature, top_k, top_p: sampling (top_k 0 disables it); `seed` or `generator`
            makes it reproducible.
        repetition_penalty: > 1 discourages ids already in the row (Hugging Face's rule).
        num_beams, length_penalty, early_stopping: beam search (True, False or "never"), as Hugging Face.
        penalty_alpha: with top_k > 1 and no sampling, contrastive search.
        eos_token_id / pad_token_id: default to the config's; finished rows continue with pad.
        min_new_tokens: eos is forbidden before this many new tokens.
        streamer: called with each step's tokens [B] (or an object with `.put`/`.end`).
        cache_implementation: "static" (preallocated, default) or "dynamic".
    Returns:
        int64 tensor [B, T + generated] (the prompt included).
    Raises:
        ValueError: bad inputs or options (the message names them).
    """
    config = model.config
    if model.training:
        model.eval()
    eos_ids = _eos_list(config.eos_token_id if eos_token_id == -1 else eos_token_id)
    pad = config.pad_token_id if pad_token_id == -1 else pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if cache_implementation not in ("static", "dynamic"):
        raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {cache_implementation!r}")

    ids_np = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    if attention_mask is None:
        mask_np = np.ones(ids_np.shape, dtype=np.int64) if ids_np.ndim == 2 else None
    else:
        is_tensor = isinstance(attention_mask, torch.Tensor)
        mask_np = attention_mask.detach().cpu().numpy() if is_tensor else np.asarray(attention_mask)
    validate_inputs(ids_np, mask_np, config)
    validate_generation_args(
        config, ids_np.shape[1], max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature, top_p=top_p, allow_zero_new_tokens=True,
    )
    device = model.device
    ids = torch.as_tensor(ids_np, dtype=torch.long, device=device)
    mask = torch.as_tensor(mask_np, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return ids
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    if num_beams > 1:
        return beam_search(
            model, ids, mask, max_new_tokens, num_beams, length_penalty, early_stopping, eos_ids, pad,
            repetition_penalty, min_new_tokens, streamer, cache_implementation,
        )
    if penalty_alpha is not None and penalty_alpha > 0 and top_k > 1 and not do_sample:
        return contrastive_search(
            model, ids, mask, max_new_tokens, penalty_alpha, top_k, eos_ids, pad, repetition_penalty,
            min_new_tokens, streamer,
        )
    return greedy_or_sample(
        model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, generator, eos_ids, pad,
        repetition_penalty, min_new_tokens, streamer, cache_implementation,
    )


def _new_cache(model: Any, kind: str, batch: int, max_length: int) -> Cache:
    if kind == "static":
        heads = model.get_decoder().layers[0].self_attn.num_heads  # local heads under tensor parallelism
        return StaticCache(model.config, batch, max_length, dtype=model.dtype, device=model.device, num_heads=heads)
    return DynamicCache()


def greedy_or_sample(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float,
    top_k: int, top_p: float, generator: torch.Generator | None, eos_ids: list[int], pad: int | None,
    repetition_penalty: float, min_new_tokens: int, streamer: Any, cache_implementation: str = "static",
) -> torch.Tensor:
    """Greedy decoding or sampling, one token per step over a KV cache (Hugging Face's `_sample`)."""
    b, t = ids.shape
    total = t + max_new_tokens
    cache = _new_cache(model, cache_implementation, b, total)
    padded = not bool(mask.all())
    sequences = torch.full((b, total), pad if pad is not None else 0, dtype=torch.long, device=ids.device)
    sequences[:, :t] = ids
    full_mask = torch.ones((b, total), dtype=torch.long, device=ids.device)  # [B, T + new]
    full_mask[:, :t] = mask
    positions = mask.sum(-1, keepdim=True)  # [B, 1]: position of the first new token
    unfinished = torch.ones(b, dtype=torch.bool, device=ids.device)
    eos = torch.tensor(eos_ids, device=ids.device) if eos_ids else None
    _emit(streamer, ids)

    logits, _ = prefill(model, ids, mask if padded else None, cache)
    length = t
    for step in range(max_new_tokens):
        logits = process_logits(logits, sequences[:, :length], repetition_penalty, step, min_new_tokens, eos_ids)
        tokens = sample(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
        if eos is not None and pad is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences[:, length] = tokens
        length += 1
        _emit(streamer, tokens)
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                break
        if step == max_new_tokens - 1:
            break
        logits, _ = decode_one_token(
            model, tokens[:, None], positions, full_mask[:, :length] if padded else None, cache
        )
        positions = positions + 1
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return sequences[:, :length]


# ---------------------------------------------------------------- beam search (HF 4.57's algorithm)
def _gather_beams(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, K']."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


def beam_search(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, num_beams: int,
    length_penalty: float, early_stopping: bool | str, eos_ids: list[int], pad: int | None,
    repetition_penalty: float = 1.0, min_new_tokens: int = 0, streamer: Any = None,
    cache_implementation: str = "static",
) -> torch.Tensor:
    """Beam search exactly as Hugging Face transformers 4.57 (`_beam_search`): keep the top
    `2 * num_beams` continuations per step, finished hypotheses scored by
    `sum log p / generated_length ** length_penalty`, the same early-stop heuristic. Returns the best
    hypothesis per row [B, T + generated]."""
    b, prompt_len = ids.shape
    k = num_beams
    max_length = prompt_len + max_new_tokens
    device = ids.device
    vocab = model.config.vocab_size
    beams_to_keep = max(2, 1 + len(eos_ids)) * k
    top_num_beam_mask = torch.cat(
        [torch.ones(k, dtype=torch.bool), torch.zeros(beams_to_keep - k, dtype=torch.bool)]
    ).to(device)
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    fill = (pad if pad else eos_ids[0]) if eos_ids else -1

    running = torch.full((b, k, max_length), fill, dtype=torch.long, device=device)  # [B, K, T_max]
    running[:, :, :prompt_len] = ids[:, None, :]
    sequences = running.clone()
    running_scores = torch.zeros((b, k), dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((b, k), -1e9, dtype=torch.float, device=device)
    is_finished = torch.zeros((b, k), dtype=torch.bool, device=device)
    improvable = torch.ones((b, 1), dtype=torch.bool, device=device)
    hits_stop = torch.zeros((b, k), dtype=torch.bool, device=device)
    running_beam_idx = torch.full((b, k, max_new_tokens), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_idx.clone()

    flat_mask = mask.repeat_interleave(k, dim=0)  # [B * K, T]
    padded = not bool(mask.all())
    full_mask = torch.ones((b * k, max_length), dtype=torch.long, device=device)
    full_mask[:, :prompt_len] = flat_mask
    positions = flat_mask.sum(-1, keepdim=True)  # [B * K, 1]
    cache = _new_cache(model, cache_implementation, b * k, max_length)

    cur_len = prompt_len
    logits, _ = prefill(model, ids.repeat_interleave(k, dim=0), flat_mask if padded else None, cache)
    while True:
        flat_running = running[:, :, :cur_len].reshape(b * k, cur_len)
        log_probs = F.log_softmax(logits, dim=-1)  # [B * K, V]
        log_probs = process_logits(
            log_probs, flat_running, repetition_penalty, cur_len - prompt_len, min_new_tokens, eos_ids
        )
        log_probs = log_probs.view(b, k, vocab) + running_scores[:, :, None]
        log_probs = log_probs.reshape(b, k * vocab)

        # The top 2K continuations (so K stay open even if some end here).
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)  # [B, 2K]
        topk_beam = topk_indices // vocab
        topk_running_beam_idx = _gather_beams(running_beam_idx, topk_beam)
        topk_running = _gather_beams(running, topk_beam)
        topk_ids = topk_indices % vocab
        topk_running[:, :, cur_len] = topk_ids
        batch_offset = torch.arange(b, device=device).view(-1, 1) * k
        topk_running_beam_idx[:, :, cur_len - prompt_len] = (topk_beam + batch_offset).to(torch.int32)

        hits_stop = torch.full_like(topk_ids, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos is not None:
            hits_stop |= torch.isin(topk_ids, eos)

        # Continue with the best K that did not stop.
        running_log = topk_log_probs + hits_stop.to(torch.float32) * -1.0e9
        next_idx = torch.topk(running_log, k=k)[1]
        running = _gather_beams(topk_running, next_idx)
        running_scores = _gather_beams(running_log, next_idx)
        running_beam_idx = _gather_beams(topk_running_beam_idx, next_idx)

        # Merge the ones that stopped (among the top K) into the finished hypotheses.
        just_finished = hits_stop & top_num_beam_mask[None, :]
        scored = topk_log_probs / ((cur_len + 1 - prompt_len) ** length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        scored = scored + full.to(torch.float32) * -1.0e9
        scored = scored + (~improvable).to(torch.float32) * -1.0e9
        scored = scored + (~just_finished) * -1.0e9
        merged_seq = torch.cat([sequences, topk_running], dim=1)
        merged_scores = torch.cat([beam_scores, scored], dim=1)
        merged_idx = torch.cat([beam_indices, topk_running_beam_idx], dim=1)
        merged_finished = torch.cat([is_finished, just_finished], dim=1)
        best = torch.topk(merged_scores, k=k)[1]
        sequences = _gather_beams(merged_seq, best)
        beam_scores = _gather_beams(merged_scores, best)
        beam_indices = _gather_beams(merged_idx, best)
        is_finished = _gather_beams(merged_finished, best)

        beam_idx = running_beam_idx[..., cur_len - prompt_len].reshape(-1).long()  # [B * K]
        cur_len += 1

        # Hugging Face's early-stop heuristic.
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_len**length_penalty)
        worst_finished = torch.where(is_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beam = ~(torch.all(is_finished) & (early_stopping is True))
        go_on = bool(torch.any(improvable)) and bool(open_beam) and not bool(torch.all(hits_stop))
        if not go_on:
            break

        cache.reorder(beam_idx)
        tokens = running[:, :, cur_len - 1].reshape(b * k, 1)
        _emit(streamer, tokens[:, 0])
        logits, _ = decode_one_token(
            model, tokens, positions, full_mask[:, :cur_len] if padded else None, cache
        )
        positions = positions + 1

    best_seq = sequences[:, 0]  # [B, T_max]
    generated = int((beam_indices[:, 0] + 1).bool().sum(dim=1).max())
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return best_seq[:, : prompt_len + generated]


# ---------------------------------------------------------------- contrastive search
def contrastive_search(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, penalty_alpha: float, top_k: int,
    eos_ids: list[int], pad: int | None, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
    streamer: Any = None,
) -> torch.Tensor:
    """Contrastive search (Su et al. 2022): among the top_k most likely tokens pick the one
    maximising `(1 - alpha) * p(token) - alpha * max cosine(h_token, h_context)`, the context being
    the final hidden states of the real tokens so far. penalty_alpha = 0 is greedy decoding."""
    b, t = ids.shape
    k = top_k
    device = ids.device
    cache = DynamicCache()
    out_mask = mask.clone()  # [B, S]
    sequences = ids
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    positions = mask.sum(-1, keepdim=True)  # [B, 1]
    _emit(streamer, ids)

    logits, out = prefill(model, ids, mask, cache, output_hidden_states=True)
    context = out.last_hidden_state  # [B, S, E]
    rows = torch.arange(b, device=device)
    for step in range(max_new_tokens):
        logits = process_logits(logits, sequences, repetition_penalty, step, min_new_tokens, eos_ids)
        probs = logits.softmax(dim=-1)
        top_probs, top_ids = torch.topk(probs, k=k, dim=-1)  # [B, K]

        # Every candidate one step ahead, batched: [B * K, 1].
        cache.reorder(rows.repeat_interleave(k))
        cand_mask = torch.cat([out_mask, torch.ones_like(out_mask[:, :1])], dim=1).repeat_interleave(k, dim=0)
        cand_logits, cand_out = decode_one_token(
            model, top_ids.reshape(-1, 1), positions.repeat_interleave(k, dim=0), cand_mask, cache
        )
        cand_hidden = cand_out.last_hidden_state  # [B * K, 1, E]
        ctx = F.normalize(context.float(), dim=-1).repeat_interleave(k, dim=0)  # [B * K, S, E]
        cosine = torch.bmm(ctx, F.normalize(cand_hidden.float(), dim=-1).transpose(1, 2)).squeeze(-1)  # [B * K, S]
        cosine = cosine.masked_fill(out_mask.repeat_interleave(k, dim=0) == 0, -1.0)
        degeneration = cosine.max(dim=-1).values.view(b, k)
        score = (1.0 - penalty_alpha) * top_probs - penalty_alpha * degeneration  # [B, K]
        choice = score.argmax(dim=-1)  # [B]
        picked = rows * k + choice
        cache.reorder(picked)
        tokens = top_ids[rows, choice]
        if eos is not None and pad is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        out_mask = torch.cat([out_mask, torch.ones_like(out_mask[:, :1])], dim=1)
        context = torch.cat([context, cand_hidden[picked]], dim=1)
        logits = cand_logits[picked]
        positions = positions + 1
        _emit(streamer, tokens)
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                break
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return sequences
