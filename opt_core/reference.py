"""The float64 NumPy reference forward pass: the executable spec every backend is tested against.

Slow on purpose, clear by design: one function per step of OPT's forward pass, shapes written down,
no fusions. Weights are a dict of canonical name -> array (see `opt_core.params`).

Shape comments use the one legend of `opt_core.shapes` (H heads, D head_dim).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from opt_core.activations import ACTIVATIONS
from opt_core.checkpoint import load_numpy_state_dict
from opt_core.config import OPTConfig
from opt_core.inputs import validate_inputs
from opt_core.masks import (
    POSITION_OFFSET,
    causal_padding_mask,
    check_pooling_pad_token,
    last_non_pad_indices,
    positions_from_mask,
)
from opt_core.params import Head, parameter_table

LAYER_NORM_EPS = 1e-5
# The cache a call takes and returns (a dynamic one: it grows with every call), per layer: keys,
# values [B, H, S, D]. Chunks of any size over it give the full pass's outputs (tests/common/test_cache_chunks.py).
PastKeyValues = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class ReferenceOutput:
    """What a reference call returns; fields not produced by a head are None."""

    last_hidden_state: np.ndarray  # [B, T, E] (after project_out)
    logits: np.ndarray | None = None  # [B, T, V] LM, [B, num_labels] classification
    start_logits: np.ndarray | None = None  # [B, T] QA
    end_logits: np.ndarray | None = None  # [B, T] QA
    past_key_values: PastKeyValues | None = None
    # embeddings, then each layer's output [B, T, C]; the last entry is `last_hidden_state` (HF's way)
    hidden_states: list[np.ndarray] = field(default_factory=list)


# ---------------------------------------------------------------- building blocks
def layer_norm(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + LAYER_NORM_EPS)
    if weight is not None:
        y = y * weight + bias
    return y


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x @ weight.T  # weight is [out, in]
    return y + bias if bias is not None else y


def softmax_rows(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis using only `allowed` entries; a row with none allowed is all
    zeros (finite), which is what 'no NaN on fully masked rows' means for the spec."""
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(allowed, np.exp(scores - row_max), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


class ReferenceOPTModel:
    """The OPT decoder (`OPTModel`) in float64 NumPy."""

    head: Head = Head.BASE

    def __init__(self, config: OPTConfig, params: dict[str, np.ndarray]):
        table = parameter_table(config, self.head)
        missing = [s.name for s in table if s.name not in params]
        wrong = [
            f"{s.name} {list(np.shape(params[s.name]))} != {list(s.shape)}"
            for s in table
            if s.name in params and tuple(np.shape(params[s.name])) != s.shape
        ]
        if missing or wrong:
            raise ValueError(f"reference weights do not fit the config: missing {missing}, wrong {wrong}")
        self.config = config
        self.params = {s.name: np.asarray(params[s.name], dtype=np.float64) for s in table}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, revision: str | None = None,
                        format: str | None = None, allow_non_finite: bool = False) -> ReferenceOPTModel:
        """Load `config.json` and weights in any format (safetensors, bin, tf-h5, flax-msgpack)
        from a Hugging Face-layout folder or Hub id (see `opt_core.checkpoint.open_checkpoint`)."""
        from opt_core.hub import resolve_pretrained

        folder = resolve_pretrained(folder, revision)
        config = OPTConfig.from_pretrained(folder)
        state, acc = load_numpy_state_dict(folder, config, cls.head, fmt=format, allow_non_finite=allow_non_finite)
        if acc.new_head:
            raise ValueError(f"{folder} lacks the {cls.head.value} head: {acc.new_head}")
        return cls(config, state)

    # ------------------------------------------------------------ pieces of the forward pass
    def _p(self, name: str) -> np.ndarray | None:
        return self.params.get(name)

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return layer_norm(x, self._p(f"{prefix}.weight"), self._p(f"{prefix}.bias"))

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return linear(x, self.params[f"{prefix}.weight"], self._p(f"{prefix}.bias"))

    def _attention(
        self, x: np.ndarray, i: int, allowed: np.ndarray, past: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        cfg = self.config
        b, t, _ = x.shape
        h, d = cfg.num_attention_heads, cfg.head_dim
        p = f"decoder.layers.{i}.self_attn"

        def heads(y: np.ndarray) -> np.ndarray:
            return y.reshape(b, t, h, d).transpose(0, 2, 1, 3)  # [B, T, C] -> [B, H, T, D]

        q = heads(self._linear(x, f"{p}.q_proj") * d**-0.5)  # scaled after projection, bias included
        k = heads(self._linear(x, f"{p}.k_proj"))
        v = heads(self._linear(x, f"{p}.v_proj"))
        if past is not None:
            k = np.concatenate([past[0], k], axis=2)  # [B, H, S, D]
            v = np.concatenate([past[1], v], axis=2)
        scores = np.einsum("bhtd,bhsd->bhts", q, k)
        probs = softmax_rows(scores, allowed)  # allowed: [B, 1, T, S]
        out = np.einsum("bhts,bhsd->bhtd", probs, v)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, h * d)  # [B, H, T, D] -> [B, T, C]
        return self._linear(out, f"{p}.out_proj"), (k, v)

    def _layer(
        self, x: np.ndarray, i: int, allowed: np.ndarray, past: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        cfg = self.config
        p = f"decoder.layers.{i}"
        act = ACTIVATIONS[cfg.activation_function]
        pre = cfg.do_layer_norm_before

        h = self._norm(x, f"{p}.self_attn_layer_norm") if pre else x
        h, kv = self._attention(h, i, allowed, past)
        x = x + h
        if not pre:
            x = self._norm(x, f"{p}.self_attn_layer_norm")

        h = self._norm(x, f"{p}.final_layer_norm") if pre else x
        h = self._linear(act(self._linear(h, f"{p}.fc1")), f"{p}.fc2")
        x = x + h
        if not pre:
            x = self._norm(x, f"{p}.final_layer_norm")
        return x, kv

    def decoder(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        past_key_values: PastKeyValues | None = None,
    ) -> ReferenceOutput:
        """Run the decoder on the new tokens `input_ids` [B, T].

        Args:
            attention_mask: [B, S] over cached + new tokens (default: all ones).
            position_ids: [B, T] (default: from the mask, so left padding works).
            past_key_values: the cache returned by an earlier call, or None.
        Returns:
            `ReferenceOutput` with `last_hidden_state` [B, T, E], the extended cache and the hidden
            states (embeddings, then each layer's output).
        """
        cfg = self.config
        input_ids = np.asarray(input_ids)
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        validate_inputs(input_ids, attention_mask, cfg, past_length)
        if attention_mask is None:
            attention_mask = np.ones((input_ids.shape[0], past_length + input_ids.shape[1]), np.int64)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_length, input_ids.shape[1])  # [B, T]

        x = self.params["decoder.embed_tokens.weight"][input_ids]  # [B, T, E]
        if cfg.has_projections:
            x = self._linear(x, "decoder.project_in")  # [B, T, C]
        x = x + self.params["decoder.embed_positions.weight"][position_ids + POSITION_OFFSET]

        allowed = causal_padding_mask(attention_mask, past_length, input_ids.shape[1])  # [B, 1, T, S]
        hidden_states = [x]
        cache: PastKeyValues = []
        for i in range(cfg.num_hidden_layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, kv = self._layer(x, i, allowed, past)
            cache.append(kv)
            hidden_states.append(x)

        if cfg.has_final_layer_norm:
            x = self._norm(x, "decoder.final_layer_norm")
        if cfg.has_projections:
            x = self._linear(x, "decoder.project_out")  # [B, T, E]
        # Hugging Face's convention, which every backend follows: the last entry is the decoder's
        # output after the final LayerNorm and project_out, not the last layer's raw output.
        hidden_states[-1] = x
        return ReferenceOutput(last_hidden_state=x, past_key_values=cache, hidden_states=hidden_states)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **kw) -> ReferenceOutput:
        return self.decoder(input_ids, attention_mask, **kw)


class ReferenceOPTForCausalLM(ReferenceOPTModel):
    """Decoder + `lm_head` (tied to the token embedding unless the config unties it)."""

    head = Head.CAUSAL_LM

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **kw) -> ReferenceOutput:
        out = self.decoder(input_ids, attention_mask, **kw)
        out.logits = out.last_hidden_state @ self.params["lm_head.weight"].T  # [B, T, V]
        return out

    def greedy(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, max_new_tokens: int = 8
    ) -> np.ndarray:
        """Greedy continuation with the cache (no eos stop): [B, T + max_new_tokens]."""
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        out = self(ids, mask)
        tokens = [ids]
        for _ in range(max_new_tokens):
            assert out.logits is not None
            nxt = out.logits[:, -1].argmax(-1)[:, None]  # [B, 1]
            tokens.append(nxt)
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            out = self(nxt, mask, past_key_values=out.past_key_values)
        return np.concatenate(tokens, axis=1)


class ReferenceOPTForSequenceClassification(ReferenceOPTModel):
    """Decoder + `score`, pooled at the right-most non-pad token of each row."""

    head = Head.SEQUENCE_CLASSIFICATION

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **kw) -> ReferenceOutput:
        out = self.decoder(input_ids, attention_mask, **kw)
        scores = linear(out.last_hidden_state, self.params["score.weight"], None)  # [B, T, L]
        rows = np.arange(scores.shape[0])
        check_pooling_pad_token(self.config.pad_token_id, len(rows))
        out.logits = scores[rows, last_non_pad_indices(input_ids, self.config.pad_token_id)]  # [B, L]
        return out


class ReferenceOPTForQuestionAnswering(ReferenceOPTModel):
    """Decoder + `qa_outputs` -> start and end logits per token."""

    head = Head.QUESTION_ANSWERING

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **kw) -> ReferenceOutput:
        out = self.decoder(input_ids, attention_mask, **kw)
        both = self._linear(out.last_hidden_state, "qa_outputs")  # [B, T, 2]
        out.start_logits, out.end_logits = both[..., 0], both[..., 1]
        return out


def random_parameters(
    config: OPTConfig, head: Head | str = Head.CAUSAL_LM, seed: int = 0, std: float | None = None
) -> dict[str, np.ndarray]:
    """Random float32 weights for every parameter of `head` (canonical names), for tests.

    Linear and embedding weights are N(0, std) (std defaults to `config.init_std`); biases and
    LayerNorm parameters are random too (not 0/1) so that a loader mixing them up fails loudly.
    Tied parameters share their target's array.
    """
    from opt_core.params import Role

    rng = np.random.default_rng(seed)
    std = config.init_std if std is None else std
    out: dict[str, np.ndarray] = {}
    for spec in parameter_table(config, head):
        if spec.tied_to is not None:
            out[spec.name] = out[spec.tied_to]
            continue
        if spec.role is Role.NORM_WEIGHT:
            arr = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        elif spec.role in (Role.NORM_BIAS, Role.LINEAR_BIAS):
            arr = 0.1 * rng.standard_normal(spec.shape)
        else:
            arr = std * rng.standard_normal(spec.shape)
        out[spec.name] = arr.astype(np.float32)
    return out
