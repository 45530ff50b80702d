"""Reduced-precision inference for opt_torch: a module swap, kept out of the model code.

`quantize_model(model, "int8")` replaces each matmul of a loaded float model with an int8 one:

- "int8": weight-only. Weights int8, one symmetric scale per output channel (max |w| / 127);
  activations stay floating point, in the model's dtype (load with `dtype="bfloat16"` for bf16
  activations: faster on CPUs with AVX512-BF16, other numbers), and the product runs in
  `aten._weight_int8pack_mm`. The safe path for any OPT size: activations are never rounded to 8 bits.
- "int4": weight-only, 4-bit weights in groups of `INT4_GROUP_SIZE` input channels, each group with
  its own scale and offset (asymmetric; gpt-fast/torchao's "tinygemm" layout), in
  `aten._weight_int4pack_mm_for_cpu` with bf16 activations. Half the bytes of int8, so the fastest
  batch-1 decode where memory bandwidth bounds it. Each weight is rounded more coarsely than in
  int8 (16 levels per group against 255 per channel; tests/torch/test_quantize.py bounds a layer's
  error at 0.1 against int8's 0.02), yet on the bundled model its perplexity is held to the same +1%
  guard as int8 and has measured no worse (README). The vocabulary table stays int8 (as for "int8").
- "w8a8": int8 weights (per output channel, symmetric) and int8 activations quantized on the fly
  (asymmetric uint8, one scale per call: per token at batch-1 decode, per tensor over a prompt or a
  batch; TF and Flax differ here, see `opt_core.quantization.W8A8`), in PyTorch's "x86" quantized
  engine, or fbgemm where it measured faster and computes the same numbers (`choose_w8a8_engine`;
  onednn rounds differently and runs only when asked for). Fast, but OPT's
  larger models (>= ~6.7B) carry a few hidden dimensions with activations many times larger than
  the rest, and rounding those to 8 bits with everything else loses accuracy (Dettmers et al.
  2022). SmoothQuant's remedy (Xiao et al. 2023) is offered: per-input-channel factors
  s_j = max|x_j|^a / max|w_j|^(1-a), calibrated once on a little text (`opt_torch.smoothquant`),
  divide the activations and multiply the weights, so that both quantize
  well; the product is unchanged in exact arithmetic.

The token embedding (and a tied `lm_head`) become one int8 table with a scale per row, shared by the
lookup and the output projection, so no float copy of the vocabulary matrix remains. Biases, the
LayerNorms, the position table and attention itself stay in the model's float dtype.

A quantized model is for inference: it has no gradients, `save_pretrained` refuses it (save the
float checkpoint and quantize at load), and `model.quantization` says what was done.

Why these modules and not torchao's (measured with torchao 0.18.0 on torch 2.13 CPU,
`benchmarks/bench_torchao.py`, opt-125m shape, 2 threads): `from_pretrained(quantize=...)`
quantizes each layer as soon as it is read, so the float model never exists whole; torchao's
`quantize_` works on a loaded float model. Peak RSS of "load the checkpoint and quantize": int8 494
MB here vs 1166 MB with torchao, int4 470 vs 1116 MB (the float model alone peaks at 739 MB;
importing torchao adds 77 MB; torchao also leaves the vocabulary table float, which ours stores
int8). Kernels, read from torchao 0.18's source: its CPU int8 weight-only linear converts the int8
weight to float on every call (`mm(x, w.to(dtype)) * scale`) instead of `_weight_int8pack_mm`, and
its CPU int4 path (the same `_weight_int4pack_mm_for_cpu` as ours) exists only as a prototype config,
the stable `Int4WeightOnlyConfig` needing CUDA-only kernels (mslk). Decode-step timings on a busy
shared machine (load average 9-13 on 2 cores) were too noisy to quote as ratios, but torchao's step
was the slower one in each of the 8 interleaved comparisons (int8/int4, batch 1/8, two runs).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opt_core.platform import cpu_info, release_freed_memory
from opt_core.quantization import QUANTIZE_MODES, check_quantize
from opt_torch.kernels import bench_inputs, pick_fastest
from opt_torch.smoothquant import (  # noqa: F401  (re-exported: the calibration API lived here)
    SMOOTHING_FILE,
    activation_ranges,
    calibrate_smoothing,
    calibration_batches,
    load_smoothing,
    must_calibrate,
    save_smoothing,
    smoothing_factors,
    smoothing_factors_for,
    stored_or_calibrated_smoothing,
)

logger = logging.getLogger("opt_torch")

MODES = QUANTIZE_MODES["torch"]
# Input channels per int4 scale/offset. Not tuned here (no test or benchmark compares group sizes):
# smaller groups round more finely and store more scales.
INT4_GROUP_SIZE = 64
W8A8_ENGINES = ("fbgemm", "x86", "onednn")
W8A8_REFERENCE_ENGINE = "x86"  # PyTorch's default on x86 CPUs: the numbers w8a8 computes unless told otherwise


def check_mode(mode: str | None) -> str | None:
    """`mode` if it is None or one of MODES; ValueError otherwise (`opt_core.quantization`)."""
    return check_quantize(mode, "torch")


# ---------------------------------------------------------------- weights
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: weight [out, in] -> (int8 [out, in], float32 scale [out]),
    weight ~= int8 * scale[:, None]. An all-zero row gets scale 1 (and zeros)."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    step = max(1, (1 << 20) // max(w.shape[1], 1))  # ~4 MB of float temporaries at a time, not a copy of w
    for r in range(0, w.shape[0], step):
        rows = w[r : r + step].float()
        s = rows.abs().amax(dim=1) / 127.0  # [rows]
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[r : r + step] = torch.round(rows / s[:, None]).clamp_(-127, 127)
        scale[r : r + step] = s
    return q, scale


def quantize_groupwise_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` input channels: weight [out, in] -> (int32 [out, in]
    of values 0..15, float32 scales_and_zeros [in // group_size, out, 2]) with
    weight ~= (q - 8) * scale + zero for each group (zero is the group's midpoint value)."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"int4 needs in_features ({in_f}) divisible by the group size ({group_size})")
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # [out, groups]
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    zero = lo + 8.0 * scale
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(out_f, in_f)
    return q, torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()


def dequantize_groupwise_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_groupwise_int4` (up to rounding): float32 [out, in]."""
    out_f, in_f = q.shape
    groups = scales_and_zeros.shape[0]
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(dim=2)  # [out, groups] each
    w = (q.float().reshape(out_f, groups, -1) - 8.0) * scale[..., None] + zero[..., None]
    return w.reshape(out_f, in_f)


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_per_channel` (up to rounding): float32 [out, in]."""
    return q.float() * scale[:, None]

def cpu_name() -> str:
    """The CPU's model name (for reports): `opt_core.platform.cpu_info`."""
    return cpu_info().model_name


def has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into int32 without int16 saturation (AVX512-VNNI / AVX-VNNI);
    without it fbgemm needs 7-bit activations (`reduce_range`)."""
    return bool(cpu_info().flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


# ---------------------------------------------------------------- the quantized modules
class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (q * scale)^T + bias with q int8 [out, in]: `aten._weight_int8pack_mm`, whose
    activations are `act_dtype` (the model's dtype); output in x's dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.act_dtype = act_dtype
        self.register_buffer("qweight", q, persistent=False)  # int8 [out, in]
        self.register_buffer("scale", scale.to(act_dtype), persistent=False)  # [out]
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype) -> Int8WeightOnlyLinear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q, scale, linear.bias, act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)  # [N, in]
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale).to(x.dtype)  # [N, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activations={self.act_dtype}"


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W^T + bias with W stored as 4-bit groups (`quantize_groupwise_int4`), packed for
    `aten._weight_int4pack_mm_for_cpu`; activations bf16 inside, output in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % group_size and self.in_features % 32 == 0:
            group_size = 32  # small models (tests): the smallest group the kernel takes
        self.group_size = group_size
        q, scales_and_zeros = quantize_groupwise_int4(weight, group_size)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [N, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)  # [N, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {self.group_size}"


class DynamicInt8Linear(nn.Module):
    """int8 weights (per output channel) x int8 activations quantized per call, in a PyTorch quantized
    engine (`torch.ops.quantized.linear_dynamic` on weights prepacked for that engine). With
    SmoothQuant factors the input is multiplied by `inv_smooth` [in] first (the weights were
    multiplied by the factors before quantizing)."""

    def __init__(
        self, weight: torch.Tensor | None, bias: torch.Tensor | None, engine: str,
        smooth: torch.Tensor | None = None, reduce_range: bool | None = None,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """`weight` [out, in] float, or `quantized` = (int8 [out, in], scale [out]) already rounded
        (a tied lm_head reuses the embedding's int8 table without a float copy)."""
        super().__init__()
        if quantized is not None:
            q, scale = quantized
        else:
            w = weight.detach()
            if smooth is not None:
                w = w.float() * smooth.float()[None, :]  # migrate the activations' range into the weights
            q, scale = quantize_per_channel(w)
        self.out_features, self.in_features = q.shape
        self.engine = engine
        self.reduce_range = (not has_vnni()) if reduce_range is None else reduce_range
        with warnings.catch_warnings():  # quantized tensors are deprecated; the engines' kernels are what we use
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        with _engine(engine):
            self._packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())
        inv = None if smooth is None else (1.0 / smooth.float())
        self.register_buffer("inv_smooth", inv, persistent=False)  # [in] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range).to(dtype)

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.inv_smooth is not None else ""
        return f"in={self.in_features}, out={self.out_features}, engine={self.engine}{smooth}"


class Int8Embedding(nn.Module):
    """A token table stored int8 with a scale per row (per vocabulary entry): lookups dequantize the
    rows they read. `as_linear` gives the tied output projection over the same int8 storage."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("qweight", q, persistent=False)  # int8 [V, E]
        self.register_buffer("scale", scale.float(), persistent=False)  # [V]

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        q, scale = quantize_per_channel(emb.weight)
        return cls(q, scale, emb.weight.dtype, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight)  # [B, T, E] int8
        return (rows.to(torch.float32) * F.embedding(ids, self.scale[:, None])).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def _engine_ctx_set(name: str) -> str:
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    return old


class _engine:
    """Temporarily select a quantized engine (packing is engine-specific; a packed weight then runs
    with its own engine whatever the global setting)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self.old = _engine_ctx_set(self.name)

    def __exit__(self, *exc: Any) -> None:
        torch.backends.quantized.engine = self.old


# ---------------------------------------------------------------- choosing kernels by measurement
def available_w8a8_engines() -> list[str]:
    return [e for e in W8A8_ENGINES if e in torch.backends.quantized.supported_engines]


def choose_w8a8_engine(weight: torch.Tensor) -> str:
    """The quantized engine for w8a8: of those this PyTorch build has (fbgemm, x86, onednn), the one
    whose dynamic int8 linear ran fastest on a weight of this shape (rows 1 and 8), among those that
    compute the reference engine's numbers bit for bit; once per process.
    `OPT_TORCH_W8A8_ENGINE` asks for one (onednn, which rounds differently, only that way)."""
    engines = available_w8a8_engines()
    if not engines:
        raise RuntimeError("this PyTorch build has no x86 quantized engine (fbgemm, x86 or onednn) for w8a8")
    cands = {}
    stand_in = torch.randn(weight.shape) * 0.02  # values of a stand-in: shape only
    for e in engines:
        lin = DynamicInt8Linear(stand_in, None, e)
        cands[e] = lin.forward
    key = ("w8a8 engine", tuple(weight.shape), torch.get_num_threads())
    reference = W8A8_REFERENCE_ENGINE if W8A8_REFERENCE_ENGINE in cands else engines[0]
    return pick_fastest(key, cands, bench_inputs(weight), "OPT_TORCH_W8A8_ENGINE", reference=reference)


# ---------------------------------------------------------------- the swap
def _factory(model: nn.Module, mode: str, smoothing: dict[str, torch.Tensor] | None,
             ) -> tuple[Callable[[torch.Tensor, torch.Tensor | None, str], nn.Module], str, torch.dtype]:
    """(make(weight, bias, group) -> quantized module, kernel name, int8 activation dtype), the
    kernel timed on a stand-in of the model's fc1 shape (memoised per process)."""
    config = model.config
    stand_in = torch.empty(config.ffn_dim, config.hidden_size)  # only its shape is used
    if mode == "int8":
        act = model.dtype  # a choice of numbers, so the caller's (dtype=), never a measurement

        def make(weight: torch.Tensor, bias: torch.Tensor | None, group: str) -> nn.Module:
            q, scale = quantize_per_channel(weight)
            return Int8WeightOnlyLinear(q, scale, bias, act)

        return make, str(act).removeprefix("torch."), act
    if mode == "int4":
        def make_int4(weight: torch.Tensor, bias: torch.Tensor | None, group: str) -> nn.Module:
            return Int4WeightOnlyLinear(weight, bias)

        return make_int4, f"int4 groups of {INT4_GROUP_SIZE}, bfloat16 activations", torch.bfloat16
    engine = choose_w8a8_engine(stand_in)

    def make_w8a8(weight: torch.Tensor, bias: torch.Tensor | None, group: str) -> nn.Module:
        smooth = smoothing.get(group) if smoothing is not None else None
        return DynamicInt8Linear(weight, bias, engine, smooth)

    return make_w8a8, engine, torch.float32


def _layer_base(model: nn.Module, i: int) -> str:
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    return f"{prefix}.layers.{i}" if prefix else f"layers.{i}"


@torch.no_grad()
def quantize_layer(model: nn.Module, i: int, make: Callable[..., nn.Module]) -> None:
    """Swap decoder layer `i`'s q/k/v (fused into `qkv_proj`), out_proj, fc1 and fc2, and release
    their float storage (also when a loader still holds the parameters)."""
    layer = model.get_decoder().layers[i]
    attn = layer.self_attn
    if attn.qkv_proj is not None:
        return  # already done (quantized while loading)
    base = _layer_base(model, i)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    old = [p for m in (*projs, attn.out_proj, layer.fc1, layer.fc2) for p in m.parameters()]
    w = torch.cat([p.weight for p in projs])  # [3C, C]
    b = torch.cat([p.bias for p in projs]) if attn.q_proj.bias is not None else None
    attn.qkv_proj = make(w, b, f"{base}.self_attn.qkv")
    del w, b
    attn._qkv = None
    attn.q_proj = attn.k_proj = attn.v_proj = None
    attn.out_proj = make(attn.out_proj.weight, attn.out_proj.bias, f"{base}.self_attn.out_proj")
    layer.fc1 = make(layer.fc1.weight, layer.fc1.bias, f"{base}.fc1")
    layer.fc2 = make(layer.fc2.weight, layer.fc2.bias, f"{base}.fc2")
    for p in old:
        p.data = p.data.new_empty(0)
    release_freed_memory()


class _LayerByLayer:
    """A `CheckpointLoad` whose `names` come layer by layer (everything outside the decoder layers
    first), calling `done(i)` once layer i's tensors are all read: `fill_parameters` through it
    quantizes each layer as soon as it is filled, so the float weights never all coexist."""

    def __init__(self, ckpt: Any, done: Callable[[int], None], before_layers: Callable[[], None]):
        self._ckpt, self._done, self._before_layers = ckpt, done, before_layers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)

    @property
    def names(self) -> Iterable[str]:
        import re

        layers: dict[int, list[str]] = {}
        for name in self._ckpt.names:
            m = re.match(r"(?:.*\.)?layers\.(\d+)\.", name)
            if m is None:
                yield name
            else:
                layers.setdefault(int(m.group(1)), []).append(name)
        self._before_layers()
        for i in sorted(layers):
            yield from layers[i]
            self._done(i)


def quantizing_checkpoint(model: nn.Module, ckpt: Any, mode: str | None, folder: Any = None,
                          calibration: Any = None) -> Any:
    """`ckpt` for `fill_parameters(model, ...)`: with `quantize=mode` each decoder layer is quantized
    as soon as it is filled (peak memory ~ the int8 model plus one float layer),
    unless calibrating SmoothQuant factors needs the whole float model first (then `ckpt` itself:
    `quantize_loaded` does everything after the load). The vocabulary table (`quantize_vocabulary`)
    is quantized once it and the other non-layer tensors are read, before the first layer."""
    if check_mode(mode) is None or (mode == "w8a8" and must_calibrate(folder, calibration)):
        return ckpt
    smoothing = stored_or_calibrated_smoothing(model, folder, calibration) if mode == "w8a8" else None
    make, kernel, act = _factory(model, mode, smoothing)
    return _LayerByLayer(ckpt, lambda i: quantize_layer(model, i, make),
                         lambda: quantize_vocabulary(model, mode, make, kernel, act))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    mode: str,
    smoothing: dict[str, torch.Tensor] | None = None,
    include_embeddings: bool = True,
) -> nn.Module:
    """Swap `model`'s matmuls (in place) for int8 ones; returns the model, in eval mode.

    Args:
        mode: "int8" (weight-only) or "w8a8".
        smoothing: SmoothQuant factors per group (`calibrate_smoothing`), w8a8 only.
        include_embeddings: also store the token table int8 (lookups and a tied lm_head); an untied
            lm_head is quantized like the other matmuls either way.
    Raises:
        ValueError: unknown mode, smoothing with int8, or a model already quantized.
    """
    check_mode(mode)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['mode']})")
    if smoothing is not None and mode != "w8a8":
        raise ValueError("SmoothQuant factors apply to quantize='w8a8' only")
    model.eval()
    decoder = model.get_decoder()
    make, kernel, act = _factory(model, mode, smoothing)
    for i in range(len(decoder.layers)):
        quantize_layer(model, i, make)
    for name in ("project_in", "project_out"):
        lin = getattr(decoder, name)
        if lin is not None:
            setattr(decoder, name, make(lin.weight, None, name))
    if include_embeddings:
        quantize_vocabulary(model, mode, make, kernel, act)
    elif isinstance(getattr(model, "lm_head", None), nn.Linear) and not _tied(model):
        model.lm_head = make(model.lm_head.weight, None, "lm_head")
    release_freed_memory()
    activations = {"int8": str(act).removeprefix("torch."), "int4": "bfloat16"}.get(mode, "uint8 per call")
    model.quantization = {"mode": mode, "kernel": kernel, "activations": activations,
                          "smoothed": smoothing is not None, "embeddings": include_embeddings, "cpu": cpu_name()}
    return model


def _tied(model: nn.Module) -> bool:
    lm_head = getattr(model, "lm_head", None)
    embed = model.get_decoder().embed_tokens
    return isinstance(lm_head, nn.Linear) and isinstance(embed, nn.Embedding) and lm_head.weight is embed.weight


@torch.no_grad()
def quantize_vocabulary(model: nn.Module, mode: str, make: Callable[..., nn.Module], kernel: str,
                        act: torch.dtype) -> None:
    """The token table as int8 rows with a scale each (`Int8Embedding`), a tied lm_head sharing that
    int8 table, an untied one quantized like the other matmuls; the float table's storage is
    released at once (also when a loader still holds the parameter). Does nothing if already done."""
    decoder = model.get_decoder()
    if isinstance(decoder.embed_tokens, Int8Embedding):
        return
    tied, old = _tied(model), decoder.embed_tokens.weight
    emb = Int8Embedding.from_embedding(decoder.embed_tokens)
    decoder.embed_tokens = emb
    if tied:
        model.lm_head = (Int8WeightOnlyLinear(emb.qweight, emb.scale, None, act) if mode in ("int8", "int4")
                         else DynamicInt8Linear(None, None, kernel, quantized=(emb.qweight, emb.scale)))
    elif isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = model.lm_head.weight
        model.lm_head = make(head, None, "lm_head")
        head.data = head.data.new_empty(0)
    old.data = old.data.new_empty(0)
    release_freed_memory()


def quantize_loaded(model: nn.Module, mode: str | None, folder: Any = None, calibration: Any = None) -> nn.Module:
    """What `from_pretrained(..., quantize=mode)` runs after loading the float weights: for w8a8 the
    SmoothQuant factors stored beside the checkpoint (or calibrated from `calibration`), then
    `quantize_model`. `mode=None` returns the model untouched."""
    if check_mode(mode) is None:
        if calibration is not None:
            raise ValueError("a calibration text needs quantize='w8a8'")
        return model
    smoothing = stored_or_calibrated_smoothing(model, folder, calibration) if mode == "w8a8" else None
    if mode == "int8" and calibration is not None:
        raise ValueError("a calibration text applies to quantize='w8a8' only")
    return quantize_model(model, mode, smoothing)
