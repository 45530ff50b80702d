"""OPT in Flax NNX: the decoder and its three task heads, mirroring `opt_torch.modeling`.

Module and parameter names follow Hugging Face's Flax OPT, so a model's `nnx.state` paths are the
Flax checkpoint paths (`model/decoder/layers/0/self_attn/q_proj/kernel`, kernels `[in, out]`).

Shape comments and einsum subscripts use the one legend of `opt_core.shapes` (H heads, D head_dim).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opt_core.checkpoint import DEFAULT_SHARD_BYTES, FROM_PRETRAINED_DOC, SAVE_PRETRAINED_DOC
from opt_core.config import OPTConfig
from opt_core.generation_config import GENERATE_DOC, GenerationConfig
from opt_core.inputs import validate_inputs
from opt_core.masks import POSITION_OFFSET, check_pooling_pad_token
from opt_core.params import Head
from opt_core.quantization import refuse_quantized_save
from opt_flax.cache import StaticCache
from opt_flax.losses import causal_lm_loss, question_answering_loss, sequence_classification_loss

LAYER_NORM_EPS = 1e-5
# Masked attention scores get this instead of -inf: a row with no visible key (left padding) then
# softmaxes to a finite uniform row instead of NaN. Scores are always float32 (see `OPTAttention`).
MASK_VALUE = float(np.finfo(np.float32).min)


def _gelu_fast(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


@jax.tree_util.register_dataclass
@dataclass
class OPTOutput:
    """What every model call returns; fields a model does not produce stay None (a JAX pytree).

    Attributes:
        loss: scalar, when labels (or QA start/end positions) are given.
        logits: [B, T, V] (causal LM) or [B, L] (sequence classification).
        last_hidden_state: [B, T, E], after the final LayerNorm and `project_out`.
        start_logits / end_logits: [B, T] (question answering).
        past_key_values: the `StaticCache`, with this call's keys and values written (when caching).
        hidden_states: as Hugging Face returns them: the input of each layer ([B, T, C]; the first is
            the embeddings), then the final output (after final LayerNorm and project_out).
    """

    loss: jax.Array | None = None
    logits: jax.Array | None = None
    last_hidden_state: jax.Array | None = None
    start_logits: jax.Array | None = None
    end_logits: jax.Array | None = None
    past_key_values: StaticCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


# ---------------------------------------------------------------- activation sharding
def constrain(x: jax.Array, *spec: str | None) -> jax.Array:
    """Pin an activation's sharding (axis names "data"/"model", see `opt_flax.sharding`) when a mesh
    with those axes is active (`with jax.set_mesh(mesh):`); a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "model"} <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


# ---------------------------------------------------------------- masks and positions
def positions_from_mask(attention_mask: jax.Array, past_length: jax.Array | int, query_length: int) -> jax.Array:
    """Position ids [B, T] of the T tokens after `past_length` in `attention_mask` [B, S] (JAX twin
    of `opt_core.masks.positions_from_mask`; `past_length` may be traced)."""
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=-1) * mask - 1  # [B, S]
    return jax.lax.dynamic_slice_in_dim(positions, past_length, query_length, axis=1)


def causal_padding_mask(attention_mask: jax.Array, past_length: jax.Array | int, query_length: int) -> jax.Array:
    """bool [B, 1, T, S]: query t (at slot past + t) may see key s (JAX twin of
    `opt_core.masks.causal_padding_mask`). Keys after the query, e.g. empty cache slots, are hidden."""
    key_length = attention_mask.shape[1]
    q_pos = jnp.arange(query_length)[:, None] + past_length  # [T, 1]
    k_pos = jnp.arange(key_length)[None, :]  # [1, S]
    return (k_pos <= q_pos)[None, None] & attention_mask.astype(bool)[:, None, None, :]


def last_non_pad_indices(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """[B] index of each row's right-most non-pad id (JAX twin of
    `opt_core.masks.last_non_pad_indices`); the last position for every row without a pad id."""
    b, t = input_ids.shape
    if pad_token_id is None:
        return jnp.full((b,), t - 1)
    return jnp.argmax(jnp.arange(t)[None, :] * (input_ids != pad_token_id), axis=1)


# ---------------------------------------------------------------- layers
def _linear(
    cfg: OPTConfig, d_in: int, d_out: int, bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs,
    )


def _layer_norm(cfg: OPTConfig, dim: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    affine = cfg.layer_norm_elementwise_affine
    # LayerNorm parameters stay float32 under any param_dtype (mixed-precision policy, see
    # opt_core.params.ParamSpec.is_norm); the exact two-pass variance matches the references.
    return nnx.LayerNorm(
        dim, epsilon=LAYER_NORM_EPS, use_bias=affine, use_scale=affine, dtype=dtype,
        param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs,
    )


class OPTLearnedPositionalEmbedding(nnx.Module):
    """The learned positions table [max_positions + 2, C]; row `pos + 2` holds position `pos`."""

    def __init__(self, cfg: OPTConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        shape = (cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        self.embedding = nnx.Param(nnx.initializers.normal(cfg.init_std)(rngs.params(), shape, param_dtype))
        self.dtype = dtype

    def __call__(self, position_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], position_ids + POSITION_OFFSET, axis=0).astype(self.dtype)


class OPTAttention(nnx.Module):
    """Multi-head self-attention with an optional static KV cache."""

    def __init__(self, cfg: OPTConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        # Declared in the canonical table's (Hugging Face's) order, as in every backend; run q, k, v.
        self.k_proj = _linear(cfg, d, d, cfg.enable_bias, dtype, param_dtype, rngs)
        self.v_proj = _linear(cfg, d, d, cfg.enable_bias, dtype, param_dtype, rngs)
        self.q_proj = _linear(cfg, d, d, cfg.enable_bias, dtype, param_dtype, rngs)
        self.out_proj = _linear(cfg, d, d, cfg.enable_bias, dtype, param_dtype, rngs)
        self.attn_dropout = nnx.Dropout(cfg.attention_dropout, deterministic=True, rngs=rngs)
        self.dtype = dtype

    def __call__(
        self,
        x: jax.Array,
        allowed: jax.Array,
        cache: StaticCache | None,
        layer_idx: int,
        deterministic: bool | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, C]; allowed bool [B, 1, T, S]; `cache` (this call's new keys and values are
        written into layer `layer_idx`'s slots) or None. Returns the output [B, T, C] and the
        layer's updated (keys, values) [B, H, S, D] when caching."""
        b, t, _ = x.shape
        heads = (b, t, self.num_heads, self.head_dim)

        def split(y: jax.Array) -> jax.Array:  # [B, T, C] -> [B, H, T, D]
            return constrain(y.reshape(heads).transpose(0, 2, 1, 3), "data", "model", None, None)

        q = split(self.q_proj(x) * self.head_dim**-0.5)  # scaled after the bias
        k = split(self.k_proj(x))
        v = split(self.v_proj(x))
        new_kv = None
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, H, S, D]
            k, v = (constrain(y, "data", "model", None, None) for y in (k, v))
            new_kv = (k, v)
        # Scores and softmax in float32 whatever the compute dtype (the fp16/bf16 NaN fix).
        scores = jnp.einsum("BHTD,BHSD->BHTS", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed, scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic)
        out = jnp.einsum("BHTS,BHSD->BTHD", probs, v.astype(self.dtype)).reshape(b, t, -1)  # [B, T, C]
        return self.out_proj(out), new_kv


class OPTDecoderLayer(nnx.Module):
    """One decoder layer; pre-LN or post-LN per `config.do_layer_norm_before`."""

    def __init__(self, cfg: OPTConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.do_layer_norm_before = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, dtype, param_dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(cfg, cfg.hidden_size, dtype, rngs)
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.ffn_dim, cfg.enable_bias, dtype, param_dtype, rngs)
        self.fc2 = _linear(cfg, cfg.ffn_dim, cfg.hidden_size, cfg.enable_bias, dtype, param_dtype, rngs)
        self.final_layer_norm = _layer_norm(cfg, cfg.hidden_size, dtype, rngs)
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs)
        self.activation = cfg.activation_function

    def __call__(
        self,
        x: jax.Array,
        allowed: jax.Array,
        cache: StaticCache | None,
        layer_idx: int,
        deterministic: bool | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        h = self.self_attn_layer_norm(x) if self.do_layer_norm_before else x
        h, new_kv = self.self_attn(h, allowed, cache, layer_idx, deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        if not self.do_layer_norm_before:
            x = self.self_attn_layer_norm(x)

        h = self.final_layer_norm(x) if self.do_layer_norm_before else x
        h = constrain(ACTIVATIONS[self.activation](self.fc1(h)), "data", None, "model")  # [B, T, F] column-parallel
        h = self.fc2(h)
        x = x + self.dropout(h, deterministic=deterministic)
        if not self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        return x, new_kv


class OPTDecoder(nnx.Module):
    """Embeddings, the layer stack, the final LayerNorm and the projections."""

    def __init__(self, cfg: OPTConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, remat: bool = False):
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs,
        )
        if cfg.pad_token_id is not None:  # Hugging Face (torch) zeroes the padding row at init, as torch and TF do
            table = self.embed_tokens.embedding
            table.set_value(table.get_value().at[cfg.pad_token_id].set(0))
        self.embed_positions = OPTLearnedPositionalEmbedding(cfg, dtype, param_dtype, rngs)
        if cfg.has_projections:
            self.project_in = _linear(cfg, cfg.embed_dim, cfg.hidden_size, False, dtype, param_dtype, rngs)
            self.project_out = _linear(cfg, cfg.hidden_size, cfg.embed_dim, False, dtype, param_dtype, rngs)
        if cfg.has_final_layer_norm:
            self.final_layer_norm = _layer_norm(cfg, cfg.hidden_size, dtype, rngs)
        self.layers = nnx.List([OPTDecoderLayer(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_hidden_layers)])
        self.layerdrop = cfg.layerdrop
        self.remat = remat
        self.rngs = rngs
        self.dtype = dtype

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        position_ids: jax.Array | None,
        cache: StaticCache | None,
        deterministic: bool | None,
        output_hidden_states: bool,
    ) -> tuple[jax.Array, StaticCache | None, tuple[jax.Array, ...] | None]:
        """input_ids [B, T]; attention_mask [B, S] (S = cache slots with a cache, else T).
        Returns the last hidden state [B, T, E], the updated cache and the hidden states."""
        cfg = self.config
        t = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, t)  # [B, T]
        allowed = causal_padding_mask(attention_mask, past, t)  # [B, 1, T, S]

        x = self.embed_tokens(input_ids)  # [B, T, E]
        if cfg.has_projections:
            x = self.project_in(x)  # [B, T, C]
        x = x + self.embed_positions(position_ids)

        training = deterministic is False or (deterministic is None and not self.layers[0].dropout.deterministic)
        hidden: list[jax.Array] = []
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(x)
            if self.remat and cache is None:
                y, kv = nnx.remat(_run_layer, static_argnums=(3,))(layer, x, allowed, deterministic)
            else:
                y, kv = layer(x, allowed, cache, i, deterministic)
            if training and self.layerdrop > 0:  # skip the whole layer with probability layerdrop
                keep = jax.random.uniform(self.rngs.dropout()) >= self.layerdrop
                y = jnp.where(keep, y, x)
            x = constrain(y, "data", None, None)  # [B, T, C] replicated over "model"
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])

        if cfg.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.has_projections:
            x = self.project_out(x)  # [B, T, E]
        if output_hidden_states:
            hidden.append(x)
        new_cache = cache.advanced(new_keys, new_values, t) if cache is not None else None
        return x, new_cache, tuple(hidden) if output_hidden_states else None


def _run_layer(layer: OPTDecoderLayer, x: jax.Array, allowed: jax.Array, deterministic: bool | None):
    return layer(x, allowed, None, 0, deterministic)


# ---------------------------------------------------------------- models
def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


_GENERATION_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> GenerationConfig
_LOADING_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> KeyAccounting


class OPTPreTrainedModel(nnx.Module):
    """What the four models share: config, input checks, loading, saving.

    Args:
        config: the model's `OPTConfig`.
        dtype: computation dtype (jnp.float32 or jnp.bfloat16).
        param_dtype: storage dtype of the weights (LayerNorm parameters stay float32).
        rngs: `nnx.Rngs` for initialisation and dropout (default `nnx.Rngs(0)`).
        remat: recompute each layer in the backward pass instead of storing its activations.
    """

    head: Head = Head.BASE

    def _init_common(
        self, config: OPTConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None, remat: bool
    ) -> nnx.Rngs:
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an opt_core.OPTConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat = remat
        return rngs if rngs is not None else nnx.Rngs(0)

    def get_decoder(self) -> OPTDecoder:
        raise NotImplementedError

    @property
    def generation_config(self) -> GenerationConfig:
        """`generate`'s defaults (generation_config.json; else the config's special tokens). Kept
        outside the module's attributes: nnx puts those in the GraphDef, which jit hashes."""
        gen = _GENERATION_CONFIGS.get(self)
        return gen if gen is not None else GenerationConfig.from_model_config(self.config)

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        _GENERATION_CONFIGS[self] = value

    @property
    def loading_info(self) -> Any:
        """The `KeyAccounting` of `from_pretrained` (None for a model built from a config); kept
        outside the module's attributes like `generation_config`."""
        return _LOADING_INFO.get(self)

    @loading_info.setter
    def loading_info(self, value: Any) -> None:
        _LOADING_INFO[self] = value

    def _prepare_inputs(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: StaticCache | None, validate: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Arrays in, checked at the Python boundary (skipped under tracing), mask sized for the cache."""
        cfg = self.config
        if input_ids is None:
            raise ValueError("input_ids is required")
        past = 0
        if cache is not None and _is_concrete(cache.length):
            past = int(cache.length)
        if validate and _is_concrete(input_ids):
            ids_np = np.asarray(input_ids)
            mask_np = np.asarray(attention_mask) if _is_concrete(attention_mask) else None
            if cache is not None and mask_np is not None and mask_np.ndim == 2 and mask_np.shape[1] == cache.max_length:
                mask_np = mask_np[:, : past + ids_np.shape[1]]
            validate_inputs(ids_np, mask_np, cfg, past)
        ids = jnp.asarray(input_ids)
        b, t = ids.shape
        if attention_mask is None:
            width = cache.max_length if cache is not None else t
            mask = jnp.ones((b, width), jnp.int32)
        else:
            mask = jnp.asarray(attention_mask).astype(jnp.int32)
            if cache is not None and mask.shape[1] != cache.max_length:
                # A [B, past + T] mask: the empty slots after it are hidden by causality anyway.
                if mask.shape[1] > cache.max_length:
                    raise ValueError(
                        f"attention_mask covers {mask.shape[1]} tokens but the cache holds only "
                        f"{cache.max_length} slots"
                    )
                mask = jnp.pad(mask, ((0, 0), (0, cache.max_length - mask.shape[1])))
        pos = jnp.asarray(position_ids).astype(jnp.int32) if position_ids is not None else None
        return ids, mask, pos

    def _run_decoder(
        self,
        input_ids: Any,
        attention_mask: Any,
        position_ids: Any,
        past_key_values: StaticCache | None,
        output_hidden_states: bool,
        deterministic: bool | None,
        validate: bool = True,
    ) -> OPTOutput:
        ids, mask, pos = self._prepare_inputs(input_ids, attention_mask, position_ids, past_key_values, validate)
        h, cache, hidden = self.get_decoder()(ids, mask, pos, past_key_values, deterministic, output_hidden_states)
        return OPTOutput(last_hidden_state=h, past_key_values=cache, hidden_states=hidden)

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nnx.state(self, nnx.Param)))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: Any = None,
        config: OPTConfig | None = None,
        format: str | None = None,
        revision: str | None = None,
        allow_non_finite: bool = False,
        quantize: str | None = None,
        **backend_options: Any,
    ) -> OPTPreTrainedModel:
        from opt_flax.io import from_pretrained

        return from_pretrained(cls, name_or_path, dtype=dtype, config=config, format=format, revision=revision,
                               allow_non_finite=allow_non_finite, quantize=quantize, **backend_options)

    from_pretrained.__func__.__doc__ = FROM_PRETRAINED_DOC + """
Flax options: `param_dtype` (storage dtype; default `dtype`, which is then the compute dtype),
`rngs` (nnx.Rngs for dropout and a new head's initialisation), `remat` (rematerialise each layer
when training).
"""

    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        max_shard_size: int | str = DEFAULT_SHARD_BYTES,
        formats: Iterable[str] | None = None,
        **backend_options: Any,
    ) -> list[Path]:
        refuse_quantized_save(self)
        from opt_flax.io import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, formats=formats, **backend_options)

    save_pretrained.__doc__ = SAVE_PRETRAINED_DOC + """
Flax options: `flax_msgpack=True` adds a `flax_model.msgpack` (Hugging Face's Flax classes load
it) and `safetensors=False` leaves safetensors out, when `formats` is not given.
"""


class OPTModel(OPTPreTrainedModel):
    """The bare decoder: `.last_hidden_state` [B, T, E]."""

    head = Head.BASE

    def __init__(self, config: OPTConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None, remat: bool = False):
        rngs = self._init_common(config, dtype, param_dtype, rngs, remat)
        self.decoder = OPTDecoder(config, dtype, param_dtype, rngs, remat)

    def get_decoder(self) -> OPTDecoder:
        return self.decoder

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: StaticCache | None = None, output_hidden_states: bool = False,
                 deterministic: bool | None = None, validate: bool = True) -> OPTOutput:
        return self._run_decoder(input_ids, attention_mask, position_ids, past_key_values,
                                 output_hidden_states, deterministic, validate)


class _WithDecoder(OPTPreTrainedModel):
    """A task head on top of `self.model` (an `OPTModel`), as Hugging Face nests them."""

    def _init_model(
        self, config: OPTConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None, remat: bool
    ) -> nnx.Rngs:
        rngs = self._init_common(config, dtype, param_dtype, rngs, remat)
        self.model = OPTModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
        return rngs

    def get_decoder(self) -> OPTDecoder:
        return self.model.decoder


class OPTForCausalLM(_WithDecoder):
    """Decoder + `lm_head` (no bias, tied to the token embedding unless the config unties it)."""

    head = Head.CAUSAL_LM

    def __init__(self, config: OPTConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None, remat: bool = False):
        rngs = self._init_model(config, dtype, param_dtype, rngs, remat)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.embed_dim, config.vocab_size, False, dtype, param_dtype, rngs)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: StaticCache | None = None, labels: Any = None,
                 output_hidden_states: bool = False, logits_to_keep: int = 0,
                 deterministic: bool | None = None, validate: bool = True) -> OPTOutput:
        """Logits [B, T, V] (the last `logits_to_keep` positions only when > 0).

        `labels` [B, T] (-100 = ignore) gives `.loss`: mean cross-entropy of token t+1 given 0..t.
        """
        out = self._run_decoder(input_ids, attention_mask, position_ids, past_key_values,
                                output_hidden_states, deterministic, validate)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        out.logits = constrain(self.lm_logits(h), "data", None, "model")  # vocab-parallel logits
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, jnp.asarray(labels))
        return out

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """[B, T, E] -> [B, T, V] through `lm_head` (or the tied token embedding)."""
        if self.config.tie_word_embeddings:
            table = self.model.decoder.embed_tokens.embedding[...]
            return jnp.einsum("BTE,VE->BTV", h, table.astype(self.dtype))
        return self.lm_head(h)

    def generate(
        self,
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
        from opt_flax import generation

        return generation.generate(
            self, input_ids, attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
            length_penalty=length_penalty, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            seed=seed, streamer=streamer, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences, penalty_alpha=penalty_alpha,
        )

    generate.__doc__ = GENERATE_DOC


class OPTForSequenceClassification(_WithDecoder):
    """Decoder + `score`, pooled at the right-most non-pad token of each row: `.logits` [B, L]."""

    head = Head.SEQUENCE_CLASSIFICATION

    def __init__(self, config: OPTConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None, remat: bool = False):
        rngs = self._init_model(config, dtype, param_dtype, rngs, remat)
        self.score = _linear(config, config.embed_dim, config.num_labels, False, dtype, param_dtype, rngs)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: StaticCache | None = None, labels: Any = None, output_hidden_states: bool = False,
                 deterministic: bool | None = None, validate: bool = True) -> OPTOutput:
        """Logits [B, L]; `labels` gives `.loss` by `config.problem_type` (inferred like Hugging
        Face when None: one label -> regression, integer labels -> single-label, else multi-label)."""
        out = self._run_decoder(input_ids, attention_mask, position_ids, past_key_values, output_hidden_states,
                                deterministic, validate)
        scores = self.score(out.last_hidden_state)  # [B, T, L]
        ids = jnp.asarray(input_ids)
        check_pooling_pad_token(self.config.pad_token_id, ids.shape[0])  # shapes are static under jit
        last = last_non_pad_indices(ids, self.config.pad_token_id)  # [B]
        out.logits = scores[jnp.arange(ids.shape[0]), last]  # [B, L]
        if labels is not None:
            out.loss = sequence_classification_loss(out.logits, jnp.asarray(labels), self.config)
        return out


class OPTForQuestionAnswering(_WithDecoder):
    """Decoder + `qa_outputs` (with bias) -> `.start_logits`, `.end_logits` [B, T]."""

    head = Head.QUESTION_ANSWERING

    def __init__(self, config: OPTConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None, remat: bool = False):
        rngs = self._init_model(config, dtype, param_dtype, rngs, remat)
        self.qa_outputs = _linear(config, config.embed_dim, 2, True, dtype, param_dtype, rngs)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: StaticCache | None = None, start_positions: Any = None, end_positions: Any = None,
                 output_hidden_states: bool = False, deterministic: bool | None = None,
                 validate: bool = True) -> OPTOutput:
        """`start_positions`/`end_positions` [B] give `.loss`: the mean of the start and end
        cross-entropies, positions clamped to [0, T] and T ignored (as Hugging Face)."""
        out = self._run_decoder(input_ids, attention_mask, position_ids, past_key_values, output_hidden_states,
                                deterministic, validate)
        both = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        out.start_logits, out.end_logits = both[..., 0], both[..., 1]
        if start_positions is not None and end_positions is not None:
            start, end = jnp.asarray(start_positions), jnp.asarray(end_positions)
            out.loss = question_answering_loss(out.start_logits, out.end_logits, start, end)
        return out


MODEL_CLASSES = {
    Head.BASE: OPTModel,
    Head.CAUSAL_LM: OPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassification,
    Head.QUESTION_ANSWERING: OPTForQuestionAnswering,
}
