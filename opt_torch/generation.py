"""Text generation for `OPTForCausalLM`: small functions beside the model, not inside it.

    prefill(model, ids, mask, cache)               -> last-position logits [B, V] (float32)
    decode_one_token(model, tok, pos, mask, cache) -> logits [B, V]
    process_logits(logits, sequences, step, opts)  -> repetition penalty, no-repeat n-gram, min_new_tokens
    warp_logits(logits, temperature, top_k, top_p) -> the sampling filters
    gumbel_noise(seed, step, rows, salt)           -> opt_core.sampling's stream, computed in torch
    next_tokens(logits, sequences, step, opts)     -> the next token [B] (argmax or Gumbel-max)
    greedy_or_sample_loop / beam_search_loop / contrastive_search_loop(model, ids, mask, opts)
                                                   -> the three decoding loops (the same names in TF / Flax)
    beam_search_step(state, log_probs, step, prompt_length, opts) -> one step of HF's beam search on a BeamState
    generate(model, ids, ...)                      -> int64 [B, prompt + generated], prompt included

The contract (signature, defaults, checks, result) is opt_core.generation_config's, shared with
the TF and Flax backends, which mirror these functions; docs/generation.md spells it out. Greedy and
beam search follow Hugging Face transformers 4.57 step for step (same processors in the same order,
same stopping rules, same length penalty, finished rows padded as Hugging Face pads them), and
contrastive search follows 4.55, so their tokens equal the NumPy reference's (opt_core.generation)
and Hugging Face's on the same weights. Sampling draws from opt_core.sampling's counter-based stream, so
a seed samples the same tokens here as in TF, Flax and the NumPy reference.

Letters in shape comments: B batch, K beams or candidates, T tokens, V vocab, E hidden width,
W n-gram windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opt_core.generation_config import (
    GENERATE_DOC,
    GenerationConfig,
    GenerationOptions,
    resolve_generation_options,
)
from opt_core.inputs import validate_inputs
from opt_core.sampling import MASK32, VOCAB_SALT, row_keys
from opt_torch import cache as kv_cache
from opt_torch.cache import Cache


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


# ---------------------------------------------------------------- logits processors (HF 4.57's order)
def apply_repetition_penalty(logits: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every id in `sequences` [B, T] (prompt and padding included, as HF): logit / penalty where
    > 0, * penalty where < 0."""
    if penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, sequences)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, sequences, score)


def banned_ngram_mask(sequences: torch.Tensor, ngram_size: int, vocab_size: int) -> torch.Tensor:
    """[B, V] True for tokens that would repeat an n-gram of `sequences` [B, T]: those that followed
    an earlier occurrence of the row's last `ngram_size - 1` tokens."""
    b, t = sequences.shape
    banned = torch.zeros((b, vocab_size), dtype=torch.int32, device=sequences.device)
    if ngram_size <= 0 or t + 1 < ngram_size or t < ngram_size:
        return banned.bool()
    windows = sequences.unfold(1, ngram_size, 1)  # [B, W, n]
    tail = sequences[:, t - ngram_size + 1:]  # [B, n - 1]
    match = (windows[:, :, :-1] == tail[:, None, :]).all(-1)  # [B, W]
    return banned.scatter_add_(1, windows[:, :, -1], match.to(torch.int32)) > 0  # duplicates add up


def apply_no_repeat_ngram(logits: torch.Tensor, sequences: torch.Tensor, ngram_size: int) -> torch.Tensor:
    if ngram_size <= 0:
        return logits
    return logits.masked_fill(banned_ngram_mask(sequences, ngram_size, logits.shape[-1]), -float("inf"))


def apply_min_new_tokens(
    logits: torch.Tensor, step: int, min_new_tokens: int, eos_ids: tuple[int, ...]
) -> torch.Tensor:
    """eos ids get -inf while fewer than `min_new_tokens` tokens were generated (`step` of them)."""
    if not eos_ids or step >= min_new_tokens:
        return logits
    logits = logits.clone()
    logits[:, list(eos_ids)] = -float("inf")
    return logits


def process_logits(logits: torch.Tensor, sequences: torch.Tensor, step: int, opts: GenerationOptions) -> torch.Tensor:
    """The processors every mode applies, in HF's order, to float32 logits [B, V] given the rows so
    far `sequences` [B, T] at generated step `step`."""
    logits = apply_repetition_penalty(logits, sequences, opts.repetition_penalty)
    logits = apply_no_repeat_ngram(logits, sequences, opts.no_repeat_ngram_size)
    return apply_min_new_tokens(logits, step, opts.min_new_tokens, opts.eos_token_ids)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep entries >= the k-th largest (ties kept, as HF); 0 or >= V keeps everything."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the least likely tokens whose ascending cumulative probability stays <= 1 - top_p
    (the most likely token always stays), as HF's TopPLogitsWarper."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as Hugging Face's warpers (sampling only)."""
    return apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)


# ---------------------------------------------------------------- the counter-based stream, in torch
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32), in two 16-bit halves of c so no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on int64 tensors holding uint32 values (opt_core.sampling.fmix32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def vocab_salt(vocab_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """fmix32(v + VOCAB_SALT) for every vocabulary entry [V] (int64): fixed per vocabulary size."""
    return fmix32((torch.arange(vocab_size, dtype=torch.int64, device=device) + VOCAB_SALT) & MASK32)


def gumbel_noise(seed: int, step: int, rows: int, salt: torch.Tensor) -> torch.Tensor:
    """float32 Gumbel noise [rows, V] of generated step `step`: bit for bit opt_core.sampling's
    uniforms, through torch's float32 log."""
    r = torch.as_tensor(row_keys(seed, step, rows).astype(np.int64), device=salt.device)  # [B]
    bits = fmix32(r[:, None] ^ salt[None, :])  # [B, V]
    u = ((bits >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    return -torch.log(-torch.log(u))


def next_tokens(
    logits: torch.Tensor, sequences: torch.Tensor, step: int, opts: GenerationOptions, salt: torch.Tensor | None,
) -> torch.Tensor:
    """The next token [B] from float32 logits [B, V]: processors, then argmax or (sampling) the
    warpers and Gumbel-max over the seeded stream."""
    logits = process_logits(logits, sequences, step, opts)
    if not opts.do_sample:
        return logits.argmax(dim=-1)
    logits = warp_logits(logits, opts.temperature, opts.top_k, opts.top_p)
    return (logits + gumbel_noise(opts.seed, step, logits.shape[0], salt)).argmax(dim=-1)


# ---------------------------------------------------------------- the public entry point
def _put(opts: GenerationOptions, tokens: torch.Tensor) -> None:
    if opts.streamer is not None:
        opts.streamer.put(tokens.detach().cpu().numpy().astype(np.int64))


def _end(opts: GenerationOptions) -> None:
    if opts.streamer is not None:
        opts.streamer.end()


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@torch.inference_mode()
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
) -> torch.Tensor:
    config = model.config
    if model.training:
        model.eval()
    ids_np = _as_numpy(input_ids)
    mask_np = None if attention_mask is None else _as_numpy(attention_mask)
    validate_inputs(ids_np, mask_np, config, generating=True)
    gen_config = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    opts = resolve_generation_options(
        config, gen_config, prompt_length=ids_np.shape[1], max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        num_beams=num_beams, length_penalty=length_penalty, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        seed=seed, streamer=streamer, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        penalty_alpha=penalty_alpha,
    )
    if seed is None and opts.seed is not None and getattr(model, "device_mesh", None) is not None:
        from opt_torch.parallel import rank0_value  # a fresh seed differs per rank: take rank 0's

        opts = dataclasses.replace(opts, seed=rank0_value(model.device_mesh, opts.seed))
    device = model.device
    ids = torch.as_tensor(ids_np.astype(np.int64), device=device)
    mask = torch.ones_like(ids) if mask_np is None else torch.as_tensor(mask_np.astype(np.int64), device=device)
    if opts.num_beams == 1 and opts.num_return_sequences > 1:  # samples: rows b * n + j, as Hugging Face
        ids = ids.repeat_interleave(opts.num_return_sequences, dim=0)
        mask = mask.repeat_interleave(opts.num_return_sequences, dim=0)
    if opts.max_new_tokens == 0:
        _put(opts, ids)
        _end(opts)
        return ids
    if opts.num_beams > 1:
        return beam_search_loop(model, ids, mask, opts)
    if opts.penalty_alpha > 0:
        return contrastive_search_loop(model, ids, mask, opts)
    return greedy_or_sample_loop(model, ids, mask, opts)


generate.__doc__ = "`model.generate(input_ids, ...)` as a function of the model.\n\n" + GENERATE_DOC


def _new_cache(model: Any, batch: int, max_length: int) -> Cache:
    heads = model.get_decoder().layers[0].self_attn.num_heads  # local heads under tensor parallelism
    return kv_cache.init_cache(model.config, batch, max_length, dtype=model.dtype, device=model.device, num_heads=heads)


def greedy_or_sample_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """Greedy decoding or sampling, one token per step over a static KV cache (HF's `_sample`)."""
    b, t = ids.shape
    total = t + opts.max_new_tokens
    cache = _new_cache(model, b, total)
    padded = not bool(mask.all())
    pad = opts.pad_token_id
    sequences = torch.full((b, total), pad, dtype=torch.long, device=ids.device)
    sequences[:, :t] = ids
    full_mask = torch.ones((b, total), dtype=torch.long, device=ids.device)  # [B, T + new]
    full_mask[:, :t] = mask
    positions = mask.sum(-1, keepdim=True)  # [B, 1]: position of the first new token
    unfinished = torch.ones(b, dtype=torch.bool, device=ids.device)
    eos = torch.tensor(opts.eos_token_ids, device=ids.device) if opts.eos_token_ids else None
    salt = vocab_salt(model.config.vocab_size, ids.device) if opts.do_sample else None
    _put(opts, ids)

    logits, _ = prefill(model, ids, mask if padded else None, cache)
    length = t
    for step in range(opts.max_new_tokens):
        tokens = next_tokens(logits, sequences[:, :length], step, opts, salt)  # [B]
        if eos is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences[:, length] = tokens
        length += 1
        _put(opts, tokens)
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                break
        if step == opts.max_new_tokens - 1:
            break
        logits, _ = decode_one_token(
            model, tokens[:, None], positions, full_mask[:, :length] if padded else None, cache
        )
        positions = positions + 1
    _end(opts)
    return sequences[:, :length]


# ---------------------------------------------------------------- beam search (HF 4.57's algorithm)
NEG = -1.0e9  # Hugging Face's "impossible" beam score, added (not assigned) as HF does


def _gather_beams(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, K, ...] -> x[b, idx[b, j], ...] for idx [B, K']."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


@dataclasses.dataclass
class BeamState:
    """Beam search's state between steps: opt_core.generation.BeamState's fields, as torch tensors
    (running [B, K, L], running_scores [B, K], running_parents [B, K, N], the same three for the
    finished hypotheses, is_finished [B, K], improvable [B, 1])."""

    running: torch.Tensor
    running_scores: torch.Tensor
    running_parents: torch.Tensor
    finished: torch.Tensor
    finished_scores: torch.Tensor
    finished_parents: torch.Tensor
    is_finished: torch.Tensor
    improvable: torch.Tensor

    @classmethod
    def start(cls, ids: torch.Tensor, num_beams: int, max_new_tokens: int, fill: int) -> BeamState:
        """Every beam of a row starts from its prompt; only beam 0 is live (the others score -1e9)."""
        b, t = ids.shape
        running = torch.full((b, num_beams, t + max_new_tokens), fill, dtype=torch.long, device=ids.device)
        running[:, :, :t] = ids[:, None, :]
        scores = torch.zeros((b, num_beams), dtype=torch.float32, device=ids.device)
        scores[:, 1:] = NEG
        parents = torch.full((b, num_beams, max_new_tokens), -1, dtype=torch.long, device=ids.device)
        return cls(running, scores, parents, running.clone(), torch.full_like(scores, NEG), parents.clone(),
                   torch.zeros((b, num_beams), dtype=torch.bool, device=ids.device),
                   torch.ones((b, 1), dtype=torch.bool, device=ids.device))


def beam_search_step(
    state: BeamState, log_probs: torch.Tensor, step: int, prompt_length: int, opts: GenerationOptions,
) -> tuple[BeamState, torch.Tensor, bool]:
    """One step of Hugging Face 4.57's `_beam_search` (opt_core.generation.beam_search_step) on
    processed log-probs [B * K, V]. Returns the new state, the flat row [B * K] each running beam
    continues (the cache reorder) and whether the search goes on."""
    b, k, max_length = state.running.shape
    vocab = log_probs.shape[-1]
    device = log_probs.device
    cur_len = prompt_length + step
    keep = max(2, 1 + len(opts.eos_token_ids)) * k  # K stay open even if the best all end here
    scores = (log_probs.view(b, k, vocab) + state.running_scores[:, :, None]).reshape(b, k * vocab)
    top_scores, top = torch.topk(scores, k=keep)  # [B, keep]
    parent, token = top // vocab, top % vocab
    top_running = _gather_beams(state.running, parent)  # [B, keep, L]
    top_running[:, :, cur_len] = token
    top_parents = _gather_beams(state.running_parents, parent)
    top_parents[:, :, step] = parent + torch.arange(b, device=device)[:, None] * k
    hits = torch.full_like(token, cur_len + 1 >= max_length, dtype=torch.bool)  # max length: every candidate ends
    if opts.eos_token_ids:
        hits |= torch.isin(token, torch.tensor(opts.eos_token_ids, device=device))

    # The best K candidates that did not end keep running.
    open_scores = top_scores + hits.to(torch.float32) * NEG
    nxt = torch.topk(open_scores, k=k)[1]
    running = _gather_beams(top_running, nxt)
    running_scores = _gather_beams(open_scores, nxt)
    running_parents = _gather_beams(top_parents, nxt)

    # Candidates that ended among the top K join the finished ones if they score higher.
    just_finished = hits & (torch.arange(keep, device=device) < k)[None, :]
    done_scores = top_scores / float(cur_len + 1 - prompt_length) ** opts.length_penalty
    full = state.is_finished.all(-1, keepdim=True) & (opts.early_stopping is True)
    done_scores = done_scores + full.to(torch.float32) * NEG + (~state.improvable).to(torch.float32) * NEG
    done_scores = done_scores + (~just_finished).to(torch.float32) * NEG
    merged_scores = torch.cat([state.finished_scores, done_scores], dim=1)
    best = torch.topk(merged_scores, k=k)[1]
    finished = _gather_beams(torch.cat([state.finished, top_running], dim=1), best)
    finished_scores = _gather_beams(merged_scores, best)
    finished_parents = _gather_beams(torch.cat([state.finished_parents, top_parents], dim=1), best)
    is_finished = _gather_beams(torch.cat([state.is_finished, just_finished], dim=1), best)

    # Hugging Face's early-stop heuristic: can the best running beam still beat the worst finished?
    if opts.early_stopping == "never" and opts.length_penalty > 0.0:
        best_length = max_length - prompt_length
    else:
        best_length = cur_len + 1 - prompt_length
    best_running = running_scores[:, :1] / float(best_length) ** opts.length_penalty
    worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], NEG)
    improvable = state.improvable & (best_running > worst_finished).any(-1, keepdim=True)
    go_on = (bool(improvable.any()) and not (bool(is_finished.all()) and opts.early_stopping is True)
             and not bool(hits.all()))
    rows = running_parents[:, :, step].reshape(-1)
    new = BeamState(running, running_scores, running_parents, finished, finished_scores, finished_parents,
                    is_finished, improvable)
    return new, rows, go_on


def beam_search_result(state: BeamState, prompt_length: int, num_return_sequences: int) -> torch.Tensor:
    """The best `num_return_sequences` hypotheses per prompt [B * n, prompt + generated], cut after
    the longest of them (Hugging Face's trim)."""
    seqs = state.finished[:, :num_return_sequences].flatten(0, 1)
    parents = state.finished_parents[:, :num_return_sequences].flatten(0, 1)
    generated = int((parents >= 0).sum(1).max())
    return seqs[:, : prompt_length + generated]


def _expanded_cache(model: Any, prompt_cache: Cache, num_beams: int, max_length: int) -> Cache:
    """A cache for B * K rows holding each prompt row's entries K times (beams of a row adjacent),
    so the prompt is run once, not once per beam."""
    batch = prompt_cache.keys[0].shape[0]
    length = prompt_cache.get_seq_length()
    cache = _new_cache(model, batch * num_beams, max_length)
    for layer, (keys, values) in enumerate(zip(prompt_cache.keys, prompt_cache.values)):
        cache.update(layer, keys[:, :, :length].repeat_interleave(num_beams, 0),
                     values[:, :, :length].repeat_interleave(num_beams, 0))
    return cache


def beam_search_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """Beam search exactly as Hugging Face transformers 4.57 (`_beam_search`), equal to
    opt_core.generation.reference_beam_search: the prompt runs once, its cache is copied to the K
    beams, then one token per beam per step. Returns [B * num_return_sequences, T + generated]."""
    b, prompt_len = ids.shape
    k = opts.num_beams
    max_length = prompt_len + opts.max_new_tokens
    padded = not bool(mask.all())
    full_mask = torch.ones((b * k, max_length), dtype=torch.long, device=ids.device)  # [B * K, S]
    full_mask[:, :prompt_len] = mask.repeat_interleave(k, dim=0)
    positions = full_mask[:, :prompt_len].sum(-1, keepdim=True)  # [B * K, 1]
    prompt_cache = _new_cache(model, b, prompt_len)
    logits, _ = prefill(model, ids, mask if padded else None, prompt_cache)
    logits = logits.repeat_interleave(k, dim=0)  # [B * K, V]
    cache = _expanded_cache(model, prompt_cache, k, max_length)
    del prompt_cache
    state = BeamState.start(ids, k, opts.max_new_tokens, opts.beam_fill_id)
    for step in range(opts.max_new_tokens):
        cur_len = prompt_len + step
        rows = state.running[:, :, :cur_len].reshape(b * k, cur_len)
        log_probs = process_logits(F.log_softmax(logits, dim=-1), rows, step, opts)
        state, parents, go_on = beam_search_step(state, log_probs, step, prompt_len, opts)
        if not go_on:
            break
        cache.reorder(parents)
        tokens = state.running[:, :, cur_len].reshape(b * k, 1)
        logits, _ = decode_one_token(model, tokens, positions, full_mask[:, : cur_len + 1] if padded else None, cache)
        positions = positions + 1
    return beam_search_result(state, prompt_len, opts.num_return_sequences)


# ---------------------------------------------------------------- contrastive search (HF 4.55's algorithm)
def contrastive_choice(
    top_probs: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, candidates: torch.Tensor,
    penalty_alpha: float,
) -> torch.Tensor:
    """Which of the K candidates each row takes (opt_core.generation.contrastive_choice): the first
    argmax of (1 - alpha) * p - alpha * max cosine(candidate, an earlier real hidden state).
    top_probs [B, K]; context [B, S, E] with context_mask [B, S]; candidates [B, K, E]. Returns [B]."""
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731  (HF divides by the norm, no epsilon)
    cosine = torch.einsum("bse,bke->bks", unit(context), unit(candidates))  # [B, K, S]
    cosine = cosine.masked_fill(context_mask[:, None, :] == 0, -float("inf"))
    score = (1.0 - penalty_alpha) * top_probs - penalty_alpha * cosine.max(dim=-1).values
    return score.argmax(dim=-1)


def contrastive_search_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """Contrastive search (Su et al. 2022) as Hugging Face 4.55, equal to
    opt_core.generation.reference_contrastive_search: the prompt runs once and its cache is copied
    to K rows per prompt; each step runs the top_k candidates one token ahead in those rows, keeps
    the one `contrastive_choice` picks and copies its row over the other K - 1. Finished rows are
    padded with pad_token_id. Returns int64 [B, T + generated]."""
    b, t = ids.shape
    k, pad, total = opts.top_k, opts.pad_token_id, t + opts.max_new_tokens
    device = ids.device
    padded = not bool(mask.all())
    prompt_cache = _new_cache(model, b, t)
    logits, out = prefill(model, ids, mask if padded else None, prompt_cache, output_hidden_states=True)
    context = torch.zeros((b, total, out.last_hidden_state.shape[-1]), dtype=torch.float32, device=device)
    context[:, :t] = out.last_hidden_state.float()  # [B, S, E]: the hidden states the candidates are held against
    cache = _expanded_cache(model, prompt_cache, k, total)  # [B * K] rows
    del prompt_cache, out
    full_mask = torch.ones((b, total), dtype=torch.long, device=device)  # [B, S]
    full_mask[:, :t] = mask
    positions = mask.sum(-1, keepdim=True).repeat_interleave(k, dim=0)  # [B * K, 1]
    sequences = torch.full((b, total), pad, dtype=torch.long, device=device)
    sequences[:, :t] = ids
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    eos = torch.tensor(opts.eos_token_ids, device=device) if opts.eos_token_ids else None
    rows = torch.arange(b, device=device)
    length = t
    for step in range(opts.max_new_tokens):
        probs = process_logits(logits, sequences[:, :length], step, opts).softmax(dim=-1)
        top_probs, top_ids = torch.topk(probs, k=k, dim=-1)  # [B, K]
        step_mask = full_mask[:, : length + 1].repeat_interleave(k, dim=0) if padded else None
        cand_logits, cand_out = decode_one_token(model, top_ids.reshape(-1, 1), positions, step_mask, cache,
                                                 output_hidden_states=True)
        cand_hidden = cand_out.last_hidden_state[:, -1].float().view(b, k, -1)  # [B, K, E]
        choice = contrastive_choice(top_probs, context[:, :length], full_mask[:, :length], cand_hidden,
                                    opts.penalty_alpha)
        picked = rows * k + choice  # [B]: the chosen candidate's row
        cache.reorder(picked.repeat_interleave(k))  # every row of a prompt continues from it
        tokens = top_ids[rows, choice]
        context[:, length] = cand_hidden[rows, choice]
        logits = cand_logits[picked]
        if eos is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences[:, length] = tokens
        length += 1
        positions = positions + 1
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                break
    return sequences[:, :length]
