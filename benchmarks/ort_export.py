"""opt_torch's causal LM with a key/value cache, exported to ONNX, and its int8 twin, for ONNX Runtime.

    PYTHONPATH=. .venv-bench/bin/python benchmarks/ort_export.py FOLDER OUT_DIR [--threads N]

Writes OUT_DIR/model-fp32.onnx (PyTorch's TorchScript exporter, `dynamo=False`: the dynamo exporter
needs onnxscript, which .venv-bench does not hold) and OUT_DIR/model-int8.onnx
(`onnxruntime.quantization.quantize_dynamic`, settings in QUANT_SETTINGS). runners._ORT runs this in a
child process, so the exporter's memory stays out of the benchmark's peak RSS.

One graph serves the prefill and every decode step (L layers, H heads, D head_dim, V vocabulary;
P tokens cached, T new):
    inputs   input_ids int64 [B, T], attention_mask int64 [B, P + T] (1 real, 0 left padding),
             position_ids int64 [B, T] (opt_core.positions_from_mask: 0 at a row's first real token;
             the graph adds OPT's offset of 2), past_key_i / past_value_i float32 [B, H, P, D]
             for i < L (P = 0 at the prefill)
    outputs  logits float32 [B, V] of the last position, present_key_i / present_value_i
             float32 [B, H, P + T, D]

The graph is traced through the model's own forward (OPTForCausalLM, its layers and attention): only
the cache is swapped for `FlatCache`, which takes the past as tensors and hands the presents back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from opt_torch import OPTForCausalLM
from opt_torch.cache import Cache

OPSET = 17
# Dynamic int8: every weight MatMul (lm_head included) runs int8 x uint8, its activations quantized per
# call (uint8, asymmetric, one scale per tensor); the token and position embeddings (Gather) are stored
# int8 and dequantized after the lookup, as CTranslate2's int8 does. Per-channel weight scales (one per
# output column): on opt-125m's random weights they cut the logits' relative error from 0.033 to 0.025
# at the same speed. reduce_range off: CPUs with VNNI (and AMX) add u8 x s8 products without saturating.
QUANT_SETTINGS = dict(per_channel=True, reduce_range=False, weight_type="QInt8",
                      op_types_to_quantize=["MatMul", "Gather"])


class FlatCache(Cache):
    """The past keys/values of every layer as given tensors [B, H, P, D]; `update` concatenates the new
    ones and keeps the result in `present` (what the graph returns)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx != len(self.present):
            raise ValueError(f"cache update for layer {layer_idx} after {len(self.present)} layers")
        past_k, past_v = self.past[layer_idx]
        kv = (torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2))  # [B, H, P + T, D]
        self.present.append(kv)
        return kv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[layer_idx][0].shape[2]


class CachedDecoder(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, past_key_0, past_value_0, ...) ->
    (last logits [B, V], present_key_0, present_value_0, ...): the flat signature ONNX needs."""

    def __init__(self, model: OPTForCausalLM):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = FlatCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1, validate=False)
        return (out.logits[:, -1], *[t for kv in cache.present for t in kv])


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names (see the module docstring)."""
    past = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_fp32(folder: Path, path: Path) -> None:
    """Trace opt_torch's model from `folder` into the ONNX file `path`.

    The trace takes a left-padded batch with a non-empty past and several new tokens, so the general
    masking path (padding and causal, `causal_padding_mask`) is the one recorded: the tracer fixes
    Python branches, and that path is exact for a prefill (P = 0) and for one-token steps as well.
    Raises if the exported graph's logits differ from the model's."""
    # Plain [out, in] weights through F.linear: oneDNN's packed weights and ops (which from_pretrained
    # may measure fastest on this CPU) have no ONNX form. The layout does not reach the graph.
    saved = os.environ.get("OPT_TORCH_LINEAR")
    os.environ["OPT_TORCH_LINEAR"] = "aten"
    try:
        model = OPTForCausalLM.from_pretrained(folder, dtype="float32").eval()
    finally:
        if saved is None:
            del os.environ["OPT_TORCH_LINEAR"]
        else:
            os.environ["OPT_TORCH_LINEAR"] = saved
    cfg = model.config
    h, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    wrapper = CachedDecoder(model).eval()
    b, p, t = 2, 3, 4
    ids = torch.randint(4, 1000, (b, t))
    mask = torch.ones(b, p + t, dtype=torch.long)
    mask[1, :2] = 0  # row 1 left-padded by 2
    pos = (torch.cumsum(mask, -1) * mask - 1)[:, p:]  # opt_core.positions_from_mask
    past = [torch.randn(b, h, p, d) * 0.1 for _ in range(2 * cfg.num_hidden_layers)]
    inputs, outputs = io_names(cfg.num_hidden_layers)
    axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "new"}, "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    with torch.no_grad():
        want = wrapper(ids, mask, pos, *past)[0].numpy()
        torch.onnx.export(wrapper, (ids, mask, pos, *past), str(path), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    constants_to_initializers(path)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(inputs, [x.numpy() for x in (ids, mask, pos, *past)], strict=True))
    got = sess.run(["logits"], feeds)[0]
    err = float(abs(got - want).max())
    if not err < 1e-3:
        raise RuntimeError(f"exported graph's logits differ from opt_torch's by {err:.2e} (max abs)")


def constants_to_initializers(path: Path, min_elements: int = 1024) -> None:
    """Make the graph's large Constant nodes initializers, in place. The fused q/k/v weights are a
    plain tensor of the attention module (`OPTAttention.fuse_qkv`), not a parameter, so the tracer
    records them as Constant nodes, and `quantize_dynamic` only quantizes MatMuls whose weight is an
    initializer."""
    import onnx
    import onnx.numpy_helper

    model = onnx.load(str(path))
    nodes = []
    for node in model.graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[0].name == "value" else None
        if value is not None and onnx.numpy_helper.to_array(value).size >= min_elements:
            value.name = node.output[0]
            model.graph.initializer.append(value)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save_external(model, path)


def save_external(model, path: Path) -> None:
    """Save `model` to `path` with its weights in `path`.data beside it: ONNX Runtime memory-maps such
    external initializers instead of parsing them out of the protobuf into copies (creating a session
    on opt-125m's int8 graph peaked at ~490 MiB RSS from one file, ~230 MiB with external data)."""
    import onnx

    path.with_name(path.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def quantize_int8(src: Path, dst: Path) -> None:
    """`src`'s MatMul weights as int8 (QUANT_SETTINGS) in `dst`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = dict(QUANT_SETTINGS, weight_type=getattr(QuantType, QUANT_SETTINGS["weight_type"]))
    quantize_dynamic(str(src), str(dst), **settings)
    save_external(onnx.load(str(dst)), dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a Hugging Face OPT folder (safetensors)")
    ap.add_argument("out", type=Path, help="directory for model-fp32.onnx and model-int8.onnx")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    export_fp32(args.folder, args.out / "model-fp32.onnx")
    print(f"exported {args.out / 'model-fp32.onnx'} ({time.perf_counter() - t:.1f} s)", flush=True)
    t = time.perf_counter()
    quantize_int8(args.out / "model-fp32.onnx", args.out / "model-int8.onnx")
    print(f"quantized {args.out / 'model-int8.onnx'} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
