"""OPT in PyTorch: the decoder and the four Hugging Face model classes.

`state_dict()` keys are exactly Hugging Face's (`model.decoder.*`, `lm_head.weight`, `score.weight`,
`qa_outputs.*`; `decoder.*` for `OPTModel`), i.e. `opt_core.params.hf_name` of the canonical table,
so checkpoints load and save without renaming.

Shape comments and einsum subscripts use the one legend of `opt_core.shapes` (H heads, D head_dim).

Attention (the module, its masks and its eager / SDPA / flash paths) lives in `opt_torch.attention`,
the weights' in-memory layout and packing in `opt_torch.layout`, the CPU matmul kernel choice in
`opt_torch.kernels`; this file holds the layers, the decoder and the heads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opt_core import POSITION_OFFSET, Head, OPTConfig
from opt_core.arrays import to_numpy
from opt_core.checkpoint import DEFAULT_SHARD_BYTES, FROM_PRETRAINED_DOC, SAVE_PRETRAINED_DOC
from opt_core.generation_config import GENERATE_DOC, GenerationConfig
from opt_core.inputs import validate_inputs
from opt_core.masks import check_pooling_pad_token
from opt_core.quantization import refuse_quantized_save
from opt_torch import generation, layout
from opt_torch.attention import (  # noqa: F401  (re-exported: opt_torch.modeling.X keeps working)
    ATTN_IMPLEMENTATIONS,
    AttentionMask,
    OPTAttention,
    _flash_attention_packed,
    build_attention_mask,
    causal_padding_mask,
    check_attn_implementation,
    eager_attention,
    flash_attention,
    positions_from_mask,
)
from opt_torch.cache import Cache, DynamicCache
from opt_torch.layout import Embedding, LayerNorm, Linear, column_major, empty_weights  # noqa: F401
from opt_torch.losses import causal_lm_loss, question_answering_loss, sequence_classification_loss


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# Same names and formulas as opt_core.activations (and Hugging Face's ACT2FN).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


@dataclass
class OPTOutput:
    """What every model call returns; fields a model does not produce stay None.

    Attributes:
        loss: scalar, when labels (or QA start/end positions) are given.
        logits: [B, T, V] (causal LM) or [B, L] (sequence classification).
        last_hidden_state: [B, T, E], after the final LayerNorm and `project_out`.
        start_logits / end_logits: [B, T] (question answering).
        past_key_values: the cache, extended by this call (when caching).
        hidden_states: as Hugging Face returns them: the input of each layer ([B, T, C]; the first is
            the embeddings), then the final output (after final LayerNorm and project_out).
        attentions: per layer [B, H, T, S] (eager attention only).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


# ---------------------------------------------------------------- pooling
def last_non_pad_indices(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[B] index of each row's right-most non-pad id (torch twin of
    `opt_core.masks.last_non_pad_indices`); the last position for every row without a pad id."""
    b, t = input_ids.shape
    if pad_token_id is None:
        return torch.full((b,), t - 1, dtype=torch.long, device=input_ids.device)
    return (torch.arange(t, device=input_ids.device) * (input_ids != pad_token_id)).argmax(-1)



# ---------------------------------------------------------------- layers
class OPTDecoderLayer(nn.Module):
    """One decoder layer, pre-LN (most sizes) or post-LN (opt-350m) as the config says."""

    def __init__(self, config: OPTConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__()
        c, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation = ACTIVATIONS[config.activation_function]
        self.self_attn = OPTAttention(config, layer_idx, attn_implementation)
        self.self_attn_layer_norm = LayerNorm(c, elementwise_affine=affine)
        self.fc1 = Linear(c, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, c, bias=config.enable_bias)
        self.final_layer_norm = LayerNorm(c, elementwise_affine=affine)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask, cache: Cache | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pre = self.do_layer_norm_before
        h = self.self_attn_layer_norm(x) if pre else x
        h, weights = self.self_attn(h, mask, cache, output_attentions)
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if not pre:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if pre else x
        h = self.fc2(self.activation(self.fc1(h)))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if not pre:
            x = self.final_layer_norm(x)
        return x, weights


class OPTDecoder(nn.Module):
    """Embeddings, the decoder layers, the final LayerNorm and the projections."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        c, e = config.hidden_size, config.embed_dim
        self.embed_tokens = Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, c)
        self.project_out = Linear(c, e, bias=False) if config.has_projections else None
        self.project_in = Linear(e, c, bias=False) if config.has_projections else None
        self.final_layer_norm = (
            LayerNorm(c, elementwise_affine=config.layer_norm_elementwise_affine)
            if config.has_final_layer_norm
            else None
        )
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, i, attn_implementation) for i in range(config.num_hidden_layers)
        )
        self.layerdrop = config.layerdrop
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        """Run the new tokens `input_ids` [B, T] (inputs already validated)."""
        b, t = input_ids.shape
        cache = past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, t)
            else:
                position_ids = positions_from_mask(attention_mask, past, t)  # [B, T]
        mask = build_attention_mask(attention_mask, t, past, input_ids.device)

        x = self.embed_tokens(input_ids)  # [B, T, E]
        if self.project_in is not None:
            x = self.project_in(x)  # [B, T, C]
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)

        hidden: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            if self.training and self.layerdrop > 0 and float(torch.rand([])) < self.layerdrop:
                continue
            if checkpointing:
                x, weights = checkpoint(layer, x, mask, None, output_attentions, use_reentrant=False)
            else:
                x, weights = layer(x, mask, cache, output_attentions)
            if output_attentions:
                attentions.append(weights)

        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [B, T, E]
        if output_hidden_states:
            hidden.append(x)
        return OPTOutput(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


# ---------------------------------------------------------------- the public models
def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)
    return torch.as_tensor(np.asarray(x), device=device, dtype=dtype)


class OPTPreTrainedModel(nn.Module):
    """What the four models share: config, input checks, weight init, loading, saving, generating."""

    head: Head = Head.BASE

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an opt_core.OPTConfig, got {type(config).__name__}")
        check_attn_implementation(attn_implementation)
        self.config = config
        self.attn_implementation = attn_implementation

    # ------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_decoder(self) -> OPTDecoder:
        """The `OPTDecoder` inside this model."""
        raise NotImplementedError

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer to "eager", "sdpa" or "flash_attention_2"."""
        check_attn_implementation(name)
        self.attn_implementation = name
        for layer in self.get_decoder().layers:
            layer.self_attn.attn_implementation = name

    @torch.no_grad()
    def optimize_layout(self, copy: bool = True, input_major: bool = True, kernel: str = "aten") -> None:
        """Lay the weights out for fast inference; `from_pretrained` does this on load, with the
        kernel and layout measured fastest on this CPU (`opt_torch.kernels.choose_linear`).

        Fuses each layer's q/k/v projections (`OPTAttention.fuse_qkv`) and, with `input_major`,
        stores every other matmul weight (and a token embedding tied to `lm_head`) input-major
        (`opt_torch.layout.column_major`); `kernel` ("aten" or "onednn", see `opt_torch.kernels.linear`) is what
        every `Linear` runs when no gradient is recorded. Parameter names, shapes, values and
        training are unchanged; only strides differ. `copy=False` only allocates (a loader fills
        every tensor next)."""
        layout.optimize_layout(self, copy, input_major, kernel)

    @torch.no_grad()
    def pack_weights(self) -> None:
        """Put the decoder layers' matmul weights (and project_in/out) into oneDNN's packed format
        (`Linear.pack`), in place of the plain tensors: inference only, on request (or
        `OPT_TORCH_LINEAR=onednn_packed` at load), since packed weights are opaque tensors. On an
        AMD EPYC it sped batch-8 fp32 decode matmuls up ~1.6x over oneDNN on plain weights. q/k/v
        are packed one by one and their fused buffer is released, so memory stays at one copy of
        the weights. The heads and the tied
        lm_head stay plain. `train()`, `unpack_weights()`, `.to()` and `load_state_dict` unpack;
        `state_dict()` writes the plain values either way."""
        layout.pack_weights(self)

    def unpack_weights(self) -> None:
        """Plain [out, in] parameters again (see `pack_weights`)."""
        layout.unpack_weights(self)

    def train(self, mode: bool = True) -> OPTPreTrainedModel:
        if mode:  # a training model keeps ordinary parameters
            self.unpack_weights()
        return super().train(mode)

    def fuse_qkv(self) -> None:
        """Fuse each layer's q/k/v projections only (see `OPTAttention.fuse_qkv`)."""
        for layer in self.get_decoder().layers:
            layer.self_attn.fuse_qkv()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass instead of storing its activations (training)."""
        self.get_decoder().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.get_decoder().gradient_checkpointing = False

    def num_parameters(self) -> int:
        """Distinct parameters (a tied tensor counts once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, module: nn.Module | None = None) -> None:
        """Hugging Face's init: Linear/Embedding weights N(0, init_std), biases 0, LayerNorm 1/0,
        the padding row of the token table 0. Applies to `module` or to the whole model."""
        if layout.building_empty():
            return
        std = self.config.init_std
        for m in (module or self).modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with the token embedding (causal LM with tied embeddings)."""

    # ------------------------------------------------------------ inputs
    def _prepare_inputs(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, past_key_values: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Numpy or torch -> tensors on the model's device, after `validate_inputs` (clear errors)."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError(
                f"past_key_values must be an opt_torch cache (DynamicCache or StaticCache), got "
                f"{type(past_key_values).__name__}; wrap legacy tuples with DynamicCache.from_legacy"
            )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        ids_np = to_numpy(input_ids)
        mask_np = None if attention_mask is None else to_numpy(attention_mask)
        validate_inputs(ids_np, mask_np, self.config, past)
        device = self.device
        ids = _as_tensor(input_ids, device, torch.long)
        mask = _as_tensor(attention_mask, device, torch.long)
        pos = _as_tensor(position_ids, device, torch.long)
        if pos is not None and tuple(pos.shape) != tuple(ids.shape):
            raise ValueError(f"position_ids has shape {tuple(pos.shape)}; expected {tuple(ids.shape)} like input_ids")
        if past_key_values is not None and past_key_values.max_length is not None:
            if past + ids.shape[1] > past_key_values.max_length:
                raise ValueError(
                    f"{past} cached + {ids.shape[1]} new tokens do not fit the StaticCache "
                    f"(max_length {past_key_values.max_length})"
                )
        return ids, mask, pos

    def _run_decoder(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        validate: bool = True,
    ) -> tuple[OPTOutput, torch.Tensor]:
        if validate:
            input_ids, attention_mask, position_ids = self._prepare_inputs(
                input_ids, attention_mask, position_ids, past_key_values
            )
        use_cache = self.config.use_cache and not self.training if use_cache is None else use_cache
        if self.get_decoder().gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        out = self.get_decoder()(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if use_cache else None,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return out, input_ids

    # ------------------------------------------------------------ IO and generation
    @classmethod
    def empty(cls, config: OPTConfig, dtype: torch.dtype, device: torch.device | str,
              attn_implementation: str = "sdpa") -> OPTPreTrainedModel:
        """The model on uninitialised storage of `dtype` on `device`, in its optimised layout, for
        loaders that fill every tensor next (`opt_torch.io`)."""
        from opt_torch.kernels import choose_linear

        on_cpu = torch.device(device).type == "cpu"
        choice = choose_linear(config.hidden_size, config.ffn_dim, dtype) if on_cpu else "aten"  # measured here
        with empty_weights(dtype, device):
            model = cls(config, attn_implementation=attn_implementation)
            model.optimize_layout(copy=False, input_major=choice == "aten_input_major",
                                  kernel="aten" if choice.startswith("aten") else "onednn")
        model.pack_on_load = choice == "onednn_packed"  # `opt_torch.io` packs once the weights are in
        return model

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
        from opt_torch.io import from_pretrained

        return from_pretrained(cls, name_or_path, dtype=dtype, config=config, format=format, revision=revision,
                               allow_non_finite=allow_non_finite, quantize=quantize, **backend_options)

    from_pretrained.__func__.__doc__ = FROM_PRETRAINED_DOC + """
torch options: `device` (where the parameters live; default CPU), `attn_implementation` ("eager",
"sdpa" (default) or "flash_attention_2"), `torch_dtype` (Hugging Face's old name for `dtype`; a
`torch.dtype` is accepted for either), `tp_plan="auto"` / `device_mesh` (tensor parallelism under
torchrun, `opt_torch.parallel`), `calibration` (w8a8: a text file for SmoothQuant factors).
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
        from opt_torch.io import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, formats=formats, **backend_options)

    save_pretrained.__doc__ = SAVE_PRETRAINED_DOC + """
torch options: none; a quantized model is refused (save the float model, pass quantize= when loading).
"""


class OPTModel(OPTPreTrainedModel):
    """The bare decoder; returns `.last_hidden_state` [B, T, E]."""

    head = Head.BASE

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.decoder = OPTDecoder(config, attn_implementation)
        self.init_weights()

    def get_decoder(self) -> OPTDecoder:
        return self.decoder

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions,
        )
        return out


class _WithDecoder(OPTPreTrainedModel):
    """A task head on top of `self.model` (an `OPTModel`), as Hugging Face nests them."""

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.model = OPTModel(config, attn_implementation)

    def get_decoder(self) -> OPTDecoder:
        return self.model.decoder


class OPTForCausalLM(_WithDecoder):
    """Decoder + `lm_head` (no bias, tied to the token embedding unless the config unties it)."""

    head = Head.CAUSAL_LM

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.lm_head = Linear(config.embed_dim, config.vocab_size, bias=False)
        self.init_weights(self.lm_head)
        self.tie_weights()
        # generate's defaults; from_pretrained replaces them with the folder's generation_config.json
        self.generation_config = GenerationConfig.from_model_config(config)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
        validate: bool = True,
    ) -> OPTOutput:
        """Logits [B, T, V] (the last `logits_to_keep` positions only when > 0).

        `labels` [B, T] (-100 = ignore) gives `.loss`: mean cross-entropy of token t+1 given 0..t.
        `validate=False` skips the input checks (generation loops, whose inputs are already checked).
        """
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions, validate,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        out.logits = self.lm_head(h)  # [B, T, V]
        if labels is not None:
            labels = _as_tensor(labels, out.logits.device, torch.long)
            out.loss = causal_lm_loss(out.logits, labels)
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
    ) -> torch.Tensor:
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

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.score = Linear(config.embed_dim, config.num_labels, bias=False)
        self.init_weights(self.score)

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        labels: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        """Logits [B, L]; `labels` gives `.loss` by `config.problem_type` (inferred like Hugging
        Face when None: one label -> regression, integer labels -> single-label, else multi-label)."""
        out, ids = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions,
        )
        scores = self.score(out.last_hidden_state)  # [B, T, L]
        check_pooling_pad_token(self.config.pad_token_id, ids.shape[0])
        last = last_non_pad_indices(ids, self.config.pad_token_id)  # [B]
        out.logits = scores[torch.arange(ids.shape[0], device=ids.device), last]  # [B, L]
        if labels is not None:
            out.loss = sequence_classification_loss(out.logits, _as_tensor(labels, out.logits.device), self.config)
        return out


class OPTForQuestionAnswering(_WithDecoder):
    """Decoder + `qa_outputs` (with bias) -> start and end logits [B, T]."""

    head = Head.QUESTION_ANSWERING

    def __init__(self, config: OPTConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, attn_implementation)
        self.qa_outputs = Linear(config.embed_dim, 2)
        self.init_weights(self.qa_outputs)

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Cache | None = None,
        start_positions: Any = None,
        end_positions: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> OPTOutput:
        """`start_positions`/`end_positions` [B] give `.loss`: the mean of the start and end
        cross-entropies, positions clamped to [0, T] and T ignored (as Hugging Face)."""
        out, _ = self._run_decoder(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states,
            output_attentions,
        )
        both = self.qa_outputs(out.last_hidden_state)  # [B, T, 2]
        out.start_logits = both[..., 0].contiguous()
        out.end_logits = both[..., 1].contiguous()
        if start_positions is not None and end_positions is not None:
            out.loss = question_answering_loss(
                out.start_logits, out.end_logits,
                _as_tensor(start_positions, both.device, torch.long),
                _as_tensor(end_positions, both.device, torch.long),
            )
        return out


MODEL_CLASSES: dict[Head, type[OPTPreTrainedModel]] = {
    Head.BASE: OPTModel,
    Head.CAUSAL_LM: OPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassification,
    Head.QUESTION_ANSWERING: OPTForQuestionAnswering,
}

