"""The canonical parameter table: the one list of OPT parameter names and shapes.

A parameter's canonical name is its Hugging Face PyTorch name without the `model.` prefix that the
task heads add: `decoder.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, `score.weight`.
Shapes are in the canonical (PyTorch) layout: Linear weights are `[out, in]`.

Every backend builds its load/save mapping from this table and every converter checks its key
accounting against it; nothing else in the project spells out parameter names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from opt_core.config import OPTConfig


class Head(enum.StrEnum):
    """Which model the table describes: the bare decoder or one of the task heads."""

    BASE = "base"  # OPTModel
    CAUSAL_LM = "causal_lm"  # OPTForCausalLM
    SEQUENCE_CLASSIFICATION = "sequence_classification"
    QUESTION_ANSWERING = "question_answering"


class Role(enum.StrEnum):
    """What a tensor is; decides its layout per framework and its dtype under mixed precision."""

    TOKEN_EMBEDDING = "token_embedding"  # [vocab, embed_dim]
    POSITION_EMBEDDING = "position_embedding"  # [max_positions + 2, hidden]
    LINEAR_WEIGHT = "linear_weight"  # [out, in]
    LINEAR_BIAS = "linear_bias"  # [out]
    NORM_WEIGHT = "norm_weight"  # [hidden]
    NORM_BIAS = "norm_bias"  # [hidden]


class Layout(enum.StrEnum):
    """How a framework stores a canonical tensor (see `opt_core.layout` for the functions)."""

    IDENTITY = "identity"
    TRANSPOSE = "transpose"  # Keras/Flax Dense kernels are [in, out]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the canonical table.

    Attributes:
        name: canonical name (HF torch name without the `model.` prefix).
        shape: canonical shape (PyTorch layout).
        role: what the tensor is.
        layer: decoder layer index, or None outside the layers.
        tied_to: canonical name this parameter shares storage with (lm_head -> embed_tokens), or
            None. A tied parameter may be absent from a checkpoint; loaders then copy its target.
    """

    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None = None
    tied_to: str | None = None

    @property
    def is_norm(self) -> bool:
        """LayerNorm parameters (kept in float32 by mixed-precision policies)."""
        return self.role in (Role.NORM_WEIGHT, Role.NORM_BIAS)

    def layout(self, framework: str) -> Layout:
        """The layout `framework` ("torch", "tf", "flax") stores this tensor in."""
        if framework == "torch":
            return Layout.IDENTITY
        if framework in ("tf", "flax"):
            return Layout.TRANSPOSE if self.role is Role.LINEAR_WEIGHT else Layout.IDENTITY
        raise ValueError(f"unknown framework {framework!r}; expected 'torch', 'tf' or 'flax'")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# The head parameters, in the order Hugging Face registers them.
HEAD_PREFIX = "model."
TIED_LM_HEAD = "lm_head.weight"
TOKEN_EMBEDDING = "decoder.embed_tokens.weight"

LAYER_LINEARS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj")


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool, layer: int | None) -> list[ParamSpec]:
    specs = [ParamSpec(f"{prefix}.weight", (out_dim, in_dim), Role.LINEAR_WEIGHT, layer)]
    if bias:
        specs.append(ParamSpec(f"{prefix}.bias", (out_dim,), Role.LINEAR_BIAS, layer))
    return specs


def _layer_norm(prefix: str, dim: int, affine: bool, layer: int | None) -> list[ParamSpec]:
    if not affine:
        return []
    return [
        ParamSpec(f"{prefix}.weight", (dim,), Role.NORM_WEIGHT, layer),
        ParamSpec(f"{prefix}.bias", (dim,), Role.NORM_BIAS, layer),
    ]


def decoder_table(config: OPTConfig) -> list[ParamSpec]:
    """The decoder's parameters (everything `OPTModel` owns), in Hugging Face's order."""
    d, e, f = config.hidden_size, config.embed_dim, config.ffn_dim
    bias, affine = config.enable_bias, config.layer_norm_elementwise_affine
    specs = [
        ParamSpec(TOKEN_EMBEDDING, (config.vocab_size, e), Role.TOKEN_EMBEDDING),
        ParamSpec(
            "decoder.embed_positions.weight",
            (config.max_position_embeddings + 2, d),
            Role.POSITION_EMBEDDING,
        ),
    ]
    if config.has_projections:
        specs += _linear("decoder.project_out", e, d, False, None)
        specs += _linear("decoder.project_in", d, e, False, None)
    if config.has_final_layer_norm:
        specs += _layer_norm("decoder.final_layer_norm", d, affine, None)
    for i in range(config.num_hidden_layers):
        p = f"decoder.layers.{i}"
        for name in LAYER_LINEARS:
            specs += _linear(f"{p}.{name}", d, d, bias, i)
        specs += _layer_norm(f"{p}.self_attn_layer_norm", d, affine, i)
        specs += _linear(f"{p}.fc1", f, d, bias, i)
        specs += _linear(f"{p}.fc2", d, f, bias, i)
        specs += _layer_norm(f"{p}.final_layer_norm", d, affine, i)
    return specs


def head_table(config: OPTConfig, head: Head | str) -> list[ParamSpec]:
    """The parameters a task head adds on top of the decoder."""
    head = Head(head)
    e = config.embed_dim
    if head is Head.BASE:
        return []
    if head is Head.CAUSAL_LM:
        tied = TOKEN_EMBEDDING if config.tie_word_embeddings else None
        return [ParamSpec(TIED_LM_HEAD, (config.vocab_size, e), Role.LINEAR_WEIGHT, tied_to=tied)]
    if head is Head.SEQUENCE_CLASSIFICATION:
        return _linear("score", config.num_labels, e, False, None)
    return _linear("qa_outputs", 2, e, True, None)


def parameter_table(config: OPTConfig, head: Head | str = Head.CAUSAL_LM) -> list[ParamSpec]:
    """Every parameter of the model `head` names, ordered as Hugging Face registers them."""
    return decoder_table(config) + head_table(config, head)


def parameter_count(config: OPTConfig, head: Head | str = Head.CAUSAL_LM) -> int:
    """Number of distinct parameters (a tied tensor counts once)."""
    return sum(s.numel for s in parameter_table(config, head) if s.tied_to is None)


def hf_name(spec_name: str, head: Head | str) -> str:
    """The Hugging Face torch `state_dict` key of a canonical name for a model of kind `head`."""
    if Head(head) is Head.BASE or not spec_name.startswith("decoder."):
        return spec_name
    return HEAD_PREFIX + spec_name


def canonical_name(key: str) -> str:
    """Strip the `model.` prefix Hugging Face heads put on decoder keys (both variants are read)."""
    return key[len(HEAD_PREFIX):] if key.startswith(HEAD_PREFIX + "decoder.") else key
