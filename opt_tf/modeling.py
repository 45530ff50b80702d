"""OPT in TensorFlow: Keras 3 `Layer`/`Model` subclasses whose math is TensorFlow ops.

Mirrors `opt_torch.modeling` class by class. Weights are created eagerly in `__init__` in the TF
layout of the canonical table (Dense kernels `[in, out]`); `named_weights()` maps every canonical
name to its variable, which is all `opt_tf.io` needs to load and save.

Shape comments and einsum subscripts use the one legend of `opt_core.shapes` (H heads, D head_dim).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"opt_tf needs Keras' TensorFlow backend, but Keras is running on {keras.backend.backend()!r}. "
        "Set the environment variable KERAS_BACKEND=tensorflow before Python starts (or before the "
        "first `import keras`), or set \"backend\": \"tensorflow\" in ~/.keras/keras.json."
    )

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core import OPTConfig  # noqa: E402
from opt_core.checkpoint import DEFAULT_SHARD_BYTES, FROM_PRETRAINED_DOC, SAVE_PRETRAINED_DOC  # noqa: E402
from opt_core.generation_config import GENERATE_DOC, GenerationConfig  # noqa: E402
from opt_core.inputs import validate_inputs  # noqa: E402
from opt_core.masks import POSITION_OFFSET, check_pooling_pad_token  # noqa: E402
from opt_core.params import Head, parameter_table  # noqa: E402
from opt_core.quantization import refuse_quantized_save  # noqa: E402
from opt_tf.attention import causal_padding_mask, positions_from_mask  # noqa: E402, F401  (re-exported)
from opt_tf.cache import StaticCache  # noqa: E402
from opt_tf.losses import causal_lm_loss, question_answering_loss, sequence_classification_loss  # noqa: E402
from opt_tf.training import KerasTrainingMixin  # noqa: E402

LAYER_NORM_EPS = 1e-5


# ---------------------------------------------------------------- activations (opt_core.activations names)
def _gelu_fast(x: tf.Tensor) -> tf.Tensor:
    return 0.5 * x * (1.0 + tf.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "relu": tf.nn.relu,
    "relu6": tf.nn.relu6,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * tf.sigmoid(1.702 * x),
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
    "sigmoid": tf.sigmoid,
    "tanh": tf.tanh,
}


@dataclass
class OPTOutput:
    """What every model call returns; fields a model does not produce stay None.

    Attributes:
        loss: scalar, when labels (or QA start/end positions) are given.
        logits: [B, T, V] (causal LM) or [B, L] (sequence classification).
        last_hidden_state: [B, T, E], after the final LayerNorm and `project_out`.
        start_logits / end_logits: [B, T] (question answering).
        past_key_values: the `StaticCache` after this call (when one was passed in).
        hidden_states: as Hugging Face returns them: the input of each layer ([B, T, C]; the first is
            the embeddings), then the final output (after final LayerNorm and project_out).
    """

    loss: tf.Tensor | None = None
    logits: tf.Tensor | None = None
    last_hidden_state: tf.Tensor | None = None
    start_logits: tf.Tensor | None = None
    end_logits: tf.Tensor | None = None
    past_key_values: StaticCache | None = None
    hidden_states: tuple[tf.Tensor, ...] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


# ---------------------------------------------------------------- masks and positions (opt_core.masks in TF)
def last_non_pad_indices(input_ids: tf.Tensor, pad_token_id: int | None) -> tf.Tensor:
    """[B] index of each row's right-most non-pad id (TF twin of
    `opt_core.masks.last_non_pad_indices`); the last position for every row without a pad id."""
    t = tf.shape(input_ids)[1]
    if pad_token_id is None:
        return tf.fill([tf.shape(input_ids)[0]], t - 1)
    non_pad = tf.cast(tf.not_equal(input_ids, pad_token_id), tf.int32)
    return tf.argmax(tf.range(t)[None, :] * non_pad, axis=1, output_type=tf.int32)


# ---------------------------------------------------------------- layers
class Linear(keras.layers.Layer):
    """y = x @ kernel + bias with the kernel in Keras layout [in, out]."""

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool, std: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.kernel = self.add_weight(
            shape=(in_dim, out_dim), name="kernel", initializer=keras.initializers.RandomNormal(0.0, std)
        )
        self.bias = self.add_weight(shape=(out_dim,), name="bias", initializer="zeros") if use_bias else None
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.tensordot(x, tf.cast(self.kernel, x.dtype), axes=1)  # [..., in] -> [..., out]
        if self.bias is None:
            return y
        # y - (-bias) is y + bias bit for bit, but XLA CPU fuses only an add into a preceding
        # matrix-vector product, and that fused kernel runs on one thread: with the plain add the
        # batch-1 decode step of opt-125m took ~1.25x as long on 2 cores.
        return y - tf.negative(tf.cast(self.bias, x.dtype))


class LayerNorm(keras.layers.Layer):
    """LayerNorm over the last axis (eps 1e-5), computed in float32; affine optional."""

    def __init__(self, dim: int, affine: bool, **kwargs: Any):
        super().__init__(**kwargs)
        self.gamma = self.add_weight(shape=(dim,), name="gamma", initializer="ones") if affine else None
        self.beta = self.add_weight(shape=(dim,), name="beta", initializer="zeros") if affine else None
        self.built = True

    def call(self, x: tf.Tensor) -> tf.Tensor:
        h = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
        y = (h - mean) * tf.math.rsqrt(var + LAYER_NORM_EPS)
        if self.gamma is not None:
            y = y * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(y, x.dtype)


class OPTAttention(keras.layers.Layer):
    """Multi-head self-attention; q is scaled after its projection (bias included)."""

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        c, std, bias = config.hidden_size, config.init_std, config.enable_bias
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dropout = config.attention_dropout
        # Declared in the canonical table's (Hugging Face's) order, as in every backend; run q, k, v.
        self.k_proj = Linear(c, c, bias, std, name="k_proj")
        self.v_proj = Linear(c, c, bias, std, name="v_proj")
        self.q_proj = Linear(c, c, bias, std, name="q_proj")
        self.out_proj = Linear(c, c, bias, std, name="out_proj")
        self.built = True

    def _heads(self, y: tf.Tensor) -> tf.Tensor:
        b, t = tf.shape(y)[0], tf.shape(y)[1]
        y = tf.reshape(y, [b, t, self.num_heads, self.head_dim])  # [B, T, C] -> [B, T, H, D]
        return tf.transpose(y, [0, 2, 1, 3])  # [B, H, T, D]

    def call(
        self,
        x: tf.Tensor,
        allowed: tf.Tensor,
        past: StaticCache | None = None,
        layer_idx: int = 0,
        training: bool = False,
    ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor] | None]:
        q = self._heads(self.q_proj(x) * self.head_dim**-0.5)
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        kv = None
        if past is not None:
            k, v = kv = past.update(layer_idx, k, v)  # [B, H, S, D]
        scores = tf.matmul(q, k, transpose_b=True)  # [B, H, T, S]
        scores = tf.cast(scores, tf.float32)  # softmax in float32 (fp16 NaN fix)
        # A large finite negative, not -inf: a row with no allowed key stays finite (uniform).
        scores = tf.where(allowed, scores, tf.float32.min)
        probs = tf.cast(tf.nn.softmax(scores, axis=-1), x.dtype)
        if training and self.dropout > 0:
            probs = tf.nn.dropout(probs, self.dropout)
        out = tf.matmul(probs, v)  # [B, H, T, D]
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, t, self.num_heads * self.head_dim])  # [B, T, C]
        return self.out_proj(out), kv


class OPTDecoderLayer(keras.layers.Layer):
    """Pre-LN (x + f(LN(x))) or post-LN (LN(x + f(x))) block of attention then MLP."""

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        c, f, std = config.hidden_size, config.ffn_dim, config.init_std
        affine, bias = config.layer_norm_elementwise_affine, config.enable_bias
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation = ACTIVATIONS[config.activation_function]
        self.self_attn = OPTAttention(config, name="self_attn")
        self.self_attn_layer_norm = LayerNorm(c, affine, name="self_attn_layer_norm")
        self.fc1 = Linear(c, f, bias, std, name="fc1")
        self.fc2 = Linear(f, c, bias, std, name="fc2")
        self.final_layer_norm = LayerNorm(c, affine, name="final_layer_norm")
        self.built = True

    def _drop(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        return tf.nn.dropout(x, self.dropout) if training and self.dropout > 0 else x

    def call(
        self,
        x: tf.Tensor,
        allowed: tf.Tensor,
        past: StaticCache | None = None,
        layer_idx: int = 0,
        training: bool = False,
    ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor] | None]:
        h = self.self_attn_layer_norm(x) if self.do_layer_norm_before else x
        h, kv = self.self_attn(h, allowed, past=past, layer_idx=layer_idx, training=training)
        x = x + self._drop(h, training)
        if not self.do_layer_norm_before:
            x = self.self_attn_layer_norm(x)

        h = self.final_layer_norm(x) if self.do_layer_norm_before else x
        h = self.fc2(self.activation(self.fc1(h)))
        x = x + self._drop(h, training)
        if not self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        return x, kv


class OPTDecoder(keras.layers.Layer):
    """Embeddings, the decoder layers, the final LayerNorm and the projections."""

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        std = config.init_std
        normal = keras.initializers.RandomNormal(0.0, std)
        self.embed_tokens = self.add_weight(
            shape=(config.vocab_size, config.embed_dim), name="embed_tokens", initializer=normal
        )
        if config.pad_token_id is not None:  # Hugging Face zeroes the padding row at init
            row = tf.one_hot(config.pad_token_id, config.vocab_size, dtype=self.embed_tokens.dtype)
            self.embed_tokens.assign(self.embed_tokens * (1.0 - row[:, None]))
        self.embed_positions = self.add_weight(
            shape=(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size),
            name="embed_positions", initializer=normal,
        )
        self.project_in = self.project_out = None
        if config.has_projections:
            self.project_out = Linear(config.hidden_size, config.embed_dim, False, std, name="project_out")
            self.project_in = Linear(config.embed_dim, config.hidden_size, False, std, name="project_in")
        self.final_layer_norm = (
            LayerNorm(config.hidden_size, config.layer_norm_elementwise_affine, name="final_layer_norm")
            if config.has_final_layer_norm
            else None
        )
        self.layers = [OPTDecoderLayer(config, name=f"layers.{i}") for i in range(config.num_hidden_layers)]
        self.built = True

    def call(
        self,
        input_ids: tf.Tensor,
        position_ids: tf.Tensor,
        key_mask: tf.Tensor,
        past_key_values: StaticCache | None = None,
        output_hidden_states: bool = False,
        training: bool = False,
    ) -> OPTOutput:
        """Run the new tokens `input_ids` [B, T] at `position_ids` [B, T] (-1 at padding).

        `key_mask` [B, S] marks the real keys: the cache's slots when `past_key_values` is given
        (S = its max_length, new tokens at slots [length, length + T)), else this call's tokens.
        """
        t = input_ids.shape[1] if input_ids.shape[1] is not None else tf.shape(input_ids)[1]
        past = past_key_values.length if past_key_values is not None else 0
        allowed = causal_padding_mask(key_mask, past, t)  # [B, 1, T, S]

        x = tf.gather(self.embed_tokens, input_ids)  # [B, T, E]
        if self.project_in is not None:
            x = self.project_in(x)  # [B, T, C]
        x = x + tf.gather(self.embed_positions, position_ids + POSITION_OFFSET)

        hidden: list[tf.Tensor] = []
        keys, values = [], []
        layerdrop = self.config.layerdrop if training else 0.0
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(x)
            if layerdrop > 0 and past_key_values is None:
                skip = tf.random.uniform([]) < layerdrop
                x = tf.cond(skip, lambda x=x: x, lambda x=x, layer=layer: layer(x, allowed, training=training)[0])
                continue
            x, kv = layer(x, allowed, past=past_key_values, layer_idx=i, training=training)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])

        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [B, T, E]
        if output_hidden_states:
            hidden.append(x)
        cache = past_key_values.advanced(keys, values, t) if past_key_values is not None else None
        return OPTOutput(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )


# ---------------------------------------------------------------- the public models
def _is_symbolic(*xs: Any) -> bool:
    return not tf.executing_eagerly() or any(isinstance(x, tf.Tensor) and not hasattr(x, "numpy") for x in xs)


class OPTPreTrainedModel(KerasTrainingMixin, keras.Model):
    """What the four models share: config, input checks, loading, saving."""

    head: Head = Head.BASE

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an opt_core.OPTConfig, got {type(config).__name__}")
        self.config = config

    def get_decoder(self) -> OPTDecoder:
        """The `OPTDecoder` inside this model."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Distinct parameters (a tied tensor counts once)."""
        return int(sum(np.prod(v.shape) for v in self.weights))

    def named_weights(self) -> dict[str, keras.Variable]:
        """Canonical name -> the variable holding it, in TF layout, for every entry of the
        canonical parameter table (`opt_core.params.parameter_table`); a tied LM head is not listed
        (it is the token embedding). Each name is looked up on the model as written: its module path
        is walked (`decoder` is `get_decoder()`, a number indexes `layers`) and its leaf picks the
        variable (`weight`/`bias`: a Linear's kernel/bias, a LayerNorm's gamma/beta, or the table
        itself for embeddings and an untied `lm_head`)."""
        return {
            spec.name: self._variable(spec.name)
            for spec in parameter_table(self.config, self.head)
            if spec.tied_to is None
        }

    def _variable(self, name: str) -> keras.Variable:
        *path, leaf = name.split(".")
        node: Any = self
        for part in path:
            if node is self and part == "decoder":
                node = self.get_decoder()
            else:
                node = node[int(part)] if part.isdigit() else getattr(node, part)
        if isinstance(node, keras.Variable) and leaf == "weight":
            return node
        # weight/bias: a Linear's (or QuantizedLinear's) kernel/bias, a LayerNorm's gamma/beta
        for attr in {"weight": ("kernel", "gamma"), "bias": ("bias", "beta")}.get(leaf, ()):
            variable = getattr(node, attr, None)
            if variable is not None:
                return variable
        raise KeyError(f"{name}: {type(self).__name__} holds no such variable")

    # ------------------------------------------------------------ inputs
    def _prepare_inputs(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, past_key_values: StaticCache | None
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """-> ids [B, T], full mask [B, past + T], position ids [B, T], key mask [B, S].

        Eagerly, the inputs are checked with `opt_core.inputs.validate_inputs` (clear errors).
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is not None and not isinstance(past_key_values, StaticCache):
            raise ValueError(
                f"past_key_values must be an opt_tf StaticCache (see opt_tf.cache.init_cache), got "
                f"{type(past_key_values).__name__}"
            )
        eager = not _is_symbolic(input_ids, attention_mask)
        past: Any = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length() if eager else past_key_values.length
        if eager:
            ids_np = np.asarray(input_ids)
            mask_np = None if attention_mask is None else np.asarray(attention_mask)
            validate_inputs(ids_np, mask_np, self.config, int(past))
            if past_key_values is not None and int(past) + ids_np.shape[1] > past_key_values.max_length:
                raise ValueError(
                    f"{int(past)} cached + {ids_np.shape[1]} new tokens do not fit the StaticCache "
                    f"(max_length {past_key_values.max_length})"
                )
        ids = tf.cast(tf.convert_to_tensor(input_ids), tf.int32)
        b, t = tf.shape(ids)[0], ids.shape[1]
        if attention_mask is None:
            mask = tf.ones([b, past + t], tf.int32)
        else:
            mask = tf.cast(tf.convert_to_tensor(attention_mask), tf.int32)
        if position_ids is None:
            pos = positions_from_mask(mask, past, t)
        else:
            pos = tf.cast(tf.convert_to_tensor(position_ids), tf.int32)
            if eager and tuple(pos.shape) != tuple(ids.shape):
                raise ValueError(
                    f"position_ids has shape {tuple(pos.shape)}; expected {tuple(ids.shape)} like input_ids"
                )
        key_mask = mask
        if past_key_values is not None:  # the mask covers past + new; the cache has max_length slots
            key_mask = tf.pad(mask, [[0, 0], [0, past_key_values.max_length - tf.shape(mask)[1]]])
        return ids, mask, pos, key_mask

    def _run_decoder(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: StaticCache | None = None,
        output_hidden_states: bool = False,
        training: bool = False,
    ) -> tuple[OPTOutput, tf.Tensor]:
        ids, _, pos, key_mask = self._prepare_inputs(input_ids, attention_mask, position_ids, past_key_values)
        out = self.get_decoder()(
            ids, pos, key_mask, past_key_values=past_key_values, output_hidden_states=output_hidden_states,
            training=training,
        )
        return out, ids

    # ------------------------------------------------------------ IO
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
        from opt_tf.io import from_pretrained

        return from_pretrained(cls, name_or_path, dtype=dtype, config=config, format=format, revision=revision,
                               allow_non_finite=allow_non_finite, quantize=quantize, **backend_options)

    from_pretrained.__func__.__doc__ = FROM_PRETRAINED_DOC + """
TF options: none; `dtype` sets the Keras dtype policy of the model (variables and compute) and
float64 is refused.
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
        from opt_tf.io import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, formats=formats, **backend_options)

    save_pretrained.__doc__ = SAVE_PRETRAINED_DOC + """
TF options: `tf_h5=True` adds a `tf_model.h5` (Hugging Face's TF classes load it) when `formats`
is not given.
"""


class OPTModel(OPTPreTrainedModel):
    """The bare decoder; returns `.last_hidden_state` [B, T, E]."""

    head = Head.BASE

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.decoder = OPTDecoder(config, name="decoder")
        self.built = True

    def get_decoder(self) -> OPTDecoder:
        return self.decoder

    def call(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: StaticCache | None = None,
        output_hidden_states: bool = False,
        training: bool = False,
    ) -> OPTOutput:
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, output_hidden_states, training
        )
        return out


class _WithDecoder(OPTPreTrainedModel):
    """A task head on top of `self.model` (an `OPTModel`), as Hugging Face nests them."""

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.model = OPTModel(config, name="model")

    def get_decoder(self) -> OPTDecoder:
        return self.model.decoder


class OPTForCausalLM(_WithDecoder):
    """Decoder + `lm_head` [V, E] (tied to the token embedding unless the config unties it)."""

    head = Head.CAUSAL_LM

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = self.add_weight(
                shape=(config.embed_dim, config.vocab_size), name="lm_head",
                initializer=keras.initializers.RandomNormal(0.0, config.init_std),
            )  # Keras layout [E, V] (canonical lm_head.weight is [V, E])
        # generate's defaults; from_pretrained replaces them with the folder's generation_config.json
        self.generation_config = GenerationConfig.from_model_config(config)
        self.built = True

    def lm_logits(self, h: tf.Tensor) -> tf.Tensor:
        """[B, T, E] -> logits [B, T, V]."""
        if isinstance(self.lm_head, keras.layers.Layer):  # an untied head after `quantize_model`
            return self.lm_head(h)
        if self.lm_head is not None:
            return tf.tensordot(h, tf.cast(self.lm_head, h.dtype), axes=1)
        b, t = tf.shape(h)[0], tf.shape(h)[1]
        # A 2-D matmul: a [B, T, E] x [V, E]^T batch matmul would broadcast the [V, E] table per row.
        flat = tf.reshape(h, [-1, h.shape[-1]])  # [B * T, E]
        logits = tf.matmul(flat, tf.cast(self.get_decoder().embed_tokens, h.dtype), transpose_b=True)
        return tf.reshape(logits, [b, t, -1])  # [B, T, V]

    def call(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: StaticCache | None = None,
        labels: Any = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        training: bool = False,
    ) -> OPTOutput:
        """Logits [B, T, V] (the last `logits_to_keep` positions only when > 0).

        `labels` [B, T] (-100 = ignore) gives `.loss`: mean cross-entropy of token t+1 given 0..t.
        """
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, output_hidden_states, training
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        out.logits = self.lm_logits(h)  # [B, T, V]
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, tf.convert_to_tensor(labels))
        return out

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
    ) -> tf.Tensor:
        from opt_tf import generation

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
    """Decoder + `score`, read at the right-most non-pad token of each row (left or right padding)."""

    head = Head.SEQUENCE_CLASSIFICATION

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.score = Linear(config.embed_dim, config.num_labels, False, config.init_std, name="score")
        self.built = True

    def call(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: StaticCache | None = None,
        labels: Any = None,
        output_hidden_states: bool = False,
        training: bool = False,
    ) -> OPTOutput:
        """Logits [B, L]; `labels` gives `.loss` by `config.problem_type` (inferred like Hugging
        Face when None: one label -> regression, integer labels -> single-label, else multi-label)."""
        out, ids = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, output_hidden_states, training
        )
        scores = self.score(out.last_hidden_state)  # [B, T, L]
        if not _is_symbolic(ids):
            check_pooling_pad_token(self.config.pad_token_id, ids.shape[0])
        last = last_non_pad_indices(ids, self.config.pad_token_id)  # [B]
        out.logits = tf.gather(scores, last, axis=1, batch_dims=1)  # [B, L]
        if labels is not None:
            out.loss = sequence_classification_loss(out.logits, tf.convert_to_tensor(labels), self.config)
        return out


class OPTForQuestionAnswering(_WithDecoder):
    """Decoder + `qa_outputs` (with bias) -> start and end logits [B, T]."""

    head = Head.QUESTION_ANSWERING

    def __init__(self, config: OPTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.qa_outputs = Linear(config.embed_dim, 2, True, config.init_std, name="qa_outputs")
        self.built = True

    def call(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: StaticCache | None = None,
        start_positions: Any = None,
        end_positions: Any = None,
        output_hidden_states: bool = False,
        training: bool = False,
    ) -> OPTOutput:
        """`start_positions`/`end_positions` [B] give `.loss`: the mean of the start and end
        cross-entropies, positions clamped to [0, T] and T ignored (as Hugging Face)."""
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, output_hidden_states, training
        )
        both = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        out.start_logits, out.end_logits = both[..., 0], both[..., 1]
        if start_positions is not None and end_positions is not None:
            out.loss = question_answering_loss(out.start_logits, out.end_logits, tf.convert_to_tensor(start_positions),
                               tf.convert_to_tensor(end_positions))
        return out


MODEL_CLASSES = {
    Head.BASE: OPTModel,
    Head.CAUSAL_LM: OPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassification,
    Head.QUESTION_ANSWERING: OPTForQuestionAnswering,
}
