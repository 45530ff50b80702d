"""The implementations the benchmarks compare: each one's environment, label and loader.

A loader takes (checkpoint folder, threads) and returns a runner with `prefill(ids, mask)` and
`generate(ids, mask, new_tokens) -> tokens generated`. Only the standard library is imported at
module level: the frameworks are imported inside the loaders, in the worker subprocess of the
implementation's own environment (common.VENVS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# name -> (environment, label)
IMPLS: dict[str, tuple[str, str]] = {
    "opt_torch": ("main", "opt_torch (this project)"),
    "opt_tf": ("main", "opt_tf (this project)"),
    "opt_flax": ("main", "opt_flax (this project)"),
    "opt_torch_bf16": ("main", "opt_torch dtype=bfloat16"),
    "opt_torch_int8": ("main", "opt_torch quantize=int8 (weight-only)"),
    "opt_torch_int4": ("main", "opt_torch quantize=int4 (weight-only, groups of 64)"),
    "opt_torch_w8a8": ("main", "opt_torch quantize=w8a8"),
    "opt_flax_int8": ("main", "opt_flax quantize=int8 (weight-only)"),
    "hf_torch": ("bench", "HF transformers 5.x torch (sdpa)"),
    "ct2_fp32": ("bench", "CTranslate2 fp32"),
    "ct2_int8": ("bench", "CTranslate2 int8"),
    "ort_fp32": ("bench", "ONNX Runtime fp32 (opt_torch export)"),
    "ort_int8": ("bench", "ONNX Runtime int8 (quantize_dynamic)"),
    "hf_tf": ("oracle", "HF 4.57.6 TF (XLA generate)"),
    "hf_flax": ("oracle", "HF 4.57.6 Flax"),
}
OURS = ("opt_torch", "opt_tf", "opt_flax", "opt_torch_bf16", "opt_torch_int8", "opt_torch_int4", "opt_torch_w8a8",
        "opt_flax_int8")
# compared with CTranslate2 and ONNX Runtime only
REDUCED = ("opt_torch_bf16", "opt_torch_int8", "opt_torch_int4", "opt_torch_w8a8", "opt_flax_int8")
PEERS = ("hf_torch", "ct2_fp32", "ct2_int8", "ort_fp32", "ort_int8", "hf_tf", "hf_flax")

def _ours(name: str):
    """This project's backend `name` from the one backend table (`opt_cli.backends`), imported here,
    in the worker, like the frameworks."""
    from opt_cli.backends import adapter

    return adapter(name)


class _Torchish:
    """opt_torch and Hugging Face torch: same calls."""

    def __init__(self, model, threads: int):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = model.eval()

    def prefill(self, ids, mask):
        t = self.torch
        with t.inference_mode():
            self.model(input_ids=t.from_numpy(ids), attention_mask=t.from_numpy(mask))

    def generate(self, ids, mask, new_tokens):
        t = self.torch
        with t.inference_mode():
            out = self.model.generate(t.from_numpy(ids), attention_mask=t.from_numpy(mask),
                                      max_new_tokens=new_tokens, do_sample=False, **self.gen_kwargs)
        return int(out.shape[1]) - ids.shape[1]

    gen_kwargs: dict = {}


def _load_opt_torch(folder, threads, **kwargs):
    if threads:  # before loading: quantize= times its candidate kernels at this thread count
        import torch

        torch.set_num_threads(threads)
    return _Torchish(_ours("torch").load(folder, **{"dtype": "float32", **kwargs}), threads)


def _load_hf_torch(folder, threads):
    import torch
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.pad_token_id = 1
    return _Torchish(model, threads)


class _TF:
    def __init__(self, model, threads: int, hf: bool):
        import tensorflow as tf

        self.tf, self.model, self.hf = tf, model, hf
        self._prefill = tf.function(lambda i, m: model(input_ids=i, attention_mask=m).logits, jit_compile=True)
        if hf:  # Hugging Face TF's fast path: the whole generate loop under XLA
            self._gen = {}

    def prefill(self, ids, mask):
        self._prefill(self.tf.constant(ids), self.tf.constant(mask)).numpy()

    def generate(self, ids, mask, new_tokens):
        tf = self.tf
        if self.hf:
            fn = self._gen.setdefault(new_tokens, tf.function(
                lambda i, m: self.model.generate(i, attention_mask=m, max_new_tokens=new_tokens, do_sample=False),
                jit_compile=True))
            out = fn(tf.constant(ids), tf.constant(mask))
        else:
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        return int(out.shape[1]) - ids.shape[1]


def _tf_threads(threads):
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _load_opt_tf(folder, threads):
    _tf_threads(threads)
    return _TF(_ours("tf").load(folder, dtype="float32"), threads, hf=False)


def _load_hf_tf(folder, threads):
    _tf_threads(threads)
    from transformers import TFOPTForCausalLM

    model = TFOPTForCausalLM.from_pretrained(folder, from_pt=True)
    model.generation_config.pad_token_id = 1
    return _TF(model, threads, hf=True)


class _OptFlax:
    def __init__(self, model):
        import jax
        from flax import nnx

        self.jax, self.model = jax, model
        # jax.jit over the split state, as opt_flax.generation does: nnx.jit re-walks the module
        # graph on every call, which costs ~0.5 s per call on the opt-125m shape.
        graphdef, self.state = nnx.split(model)

        def forward(state, ids, mask):
            return nnx.merge(graphdef, state)(input_ids=ids, attention_mask=mask).logits

        self._prefill = jax.jit(forward)

    def prefill(self, ids, mask):
        self._prefill(self.state, ids, mask).block_until_ready()

    def generate(self, ids, mask, new_tokens):
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        return int(self.jax.block_until_ready(out).shape[1]) - ids.shape[1]


def _load_opt_flax(folder, threads, **kwargs):
    return _OptFlax(_ours("flax").load(folder, **{"dtype": "float32", **kwargs}))


class _HFFlax:
    def __init__(self, model):
        import jax

        self.jax, self.model = jax, model
        self._prefill = jax.jit(lambda p, i, k: model(i, attention_mask=k, params=p).logits)

    def prefill(self, ids, mask):
        self._prefill(self.model.params, ids, mask).block_until_ready()

    def generate(self, ids, mask, new_tokens):
        # Hugging Face Flax takes neither eos None (jnp.array(None)) nor -1 (validation); vocab_size
        # is a valid integer that no logit can produce, so eos stays off.
        eos = self.model.config.eos_token_id
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=self.model.config.vocab_size if eos is None else eos)
        return int(self.jax.block_until_ready(out.sequences).shape[1]) - ids.shape[1]


def _load_hf_flax(folder, threads):
    from transformers import FlaxOPTForCausalLM

    model = FlaxOPTForCausalLM.from_pretrained(folder, from_pt=True)
    model.generation_config.pad_token_id = 1
    return _HFFlax(model)


class _CT2:
    def __init__(self, folder, threads, quantization):
        import ctranslate2

        out = Path(folder).with_name(Path(folder).name + f"-ct2-{quantization}")
        t0 = time.perf_counter()
        if not (out / "model.bin").is_file():
            # In a child process, so the converter's (transformers) memory stays out of peak RSS.
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            code = ("import sys; from ctranslate2.converters import TransformersConverter; "
                    "TransformersConverter(sys.argv[1]).convert(sys.argv[2], quantization=sys.argv[3])")
            subprocess.run([sys.executable, "-c", code, str(folder), str(tmp), quantization], check=True,
                           capture_output=True)
            tmp.rename(out)
        self.convert_s = time.perf_counter() - t0
        self.gen = ctranslate2.Generator(str(out), device="cpu", compute_type=quantization,
                                         intra_threads=threads or 0)
        vocab_file = out / "vocabulary.json"
        if vocab_file.is_file():
            self.vocab = json.loads(vocab_file.read_text())
        else:
            self.vocab = (out / "vocabulary.txt").read_text(encoding="utf-8").split("\n")

    def prefill(self, ids, mask):
        self.gen.forward_batch([row.tolist() for row in ids])

    def generate(self, ids, mask, new_tokens):
        tokens = [[self.vocab[i] for i in row] for row in ids]
        res = self.gen.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                      include_prompt_in_result=False)
        return max(len(r.sequences_ids[0]) for r in res)


class _ORT:
    """ONNX Runtime on opt_torch's model exported with its key/value cache (benchmarks/ort_export.py):
    `precision` "fp32" or "int8" (quantize_dynamic of the fp32 graph). A greedy loop in NumPy over
    `InferenceSession.run_with_iobinding`: each step's present keys/values stay ONNX Runtime values and
    are bound as the next step's past, so no cache is copied through NumPy."""

    def __init__(self, folder, threads, precision):
        import numpy as np

        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("onnxruntime is not installed in this environment (make bench-env installs "
                              "requirements/bench.txt)") from e
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from opt_core import positions_from_mask

        self.np, self.ort, self.positions_from_mask = np, ort, positions_from_mask
        out = Path(folder).with_name(Path(folder).name + "-onnx")
        t0 = time.perf_counter()
        if not (out / "model-int8.onnx").is_file():
            # In a child process, so the exporter's (torch, onnx) memory stays out of peak RSS.
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            root = Path(__file__).resolve().parents[1]
            proc = subprocess.run([sys.executable, str(root / "benchmarks" / "ort_export.py"), str(folder), str(tmp),
                                   "--threads", str(threads)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(root)})
            if proc.returncode != 0:
                raise RuntimeError(f"ONNX export failed: {proc.stderr.strip()[-2000:]}")
            tmp.rename(out)
        self.convert_s = time.perf_counter() - t0
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(out / f"model-{precision}.onnx"), opts,
                                         providers=["CPUExecutionProvider"])
        cfg = json.loads((Path(folder) / "config.json").read_text())
        self.heads = cfg["num_attention_heads"]
        self.head_dim = cfg["hidden_size"] // self.heads
        self.past_names = [i.name for i in self.sess.get_inputs()][3:]
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def _step(self, ids, mask, past):
        """Run new tokens `ids` [B, T] over `past` (OrtValues); returns (logits [B, V], presents)."""
        np = self.np
        binding = self.sess.io_binding()
        p = mask.shape[1] - ids.shape[1]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", self.positions_from_mask(mask, p, ids.shape[1]))
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self.out_names:
            binding.bind_output(name, "cpu")
        self.sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), outs[1:]

    def _empty_past(self, batch):
        empty = self.np.zeros((batch, self.heads, 0, self.head_dim), self.np.float32)  # [B, H, 0, D]
        return [self.ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]

    def logits(self, ids, mask):
        """The last position's logits [B, V] of the prompt."""
        return self._step(ids, mask, self._empty_past(ids.shape[0]))[0]

    def prefill(self, ids, mask):
        self.logits(ids, mask)

    def greedy(self, ids, mask, new_tokens):
        """`new_tokens` greedy tokens [B, new_tokens] after the (left-padded) prompt; eos off."""
        np = self.np
        logits, past = self._step(ids, mask, self._empty_past(ids.shape[0]))
        tokens = []
        for i in range(new_tokens):
            nxt = logits.argmax(-1)[:, None]  # [B, 1]
            tokens.append(nxt)
            if i + 1 < new_tokens:
                mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
                logits, past = self._step(nxt, mask, past)
        return np.concatenate(tokens, axis=1)

    def generate(self, ids, mask, new_tokens):
        return self.greedy(ids, mask, new_tokens).shape[1]


LOADERS = {
    "opt_torch": _load_opt_torch,
    "opt_tf": _load_opt_tf,
    "opt_flax": _load_opt_flax,
    "opt_torch_bf16": lambda folder, threads: _load_opt_torch(folder, threads, dtype="bfloat16"),
    "opt_torch_int8": lambda folder, threads: _load_opt_torch(folder, threads, quantize="int8"),
    "opt_torch_int4": lambda folder, threads: _load_opt_torch(folder, threads, quantize="int4"),
    "opt_torch_w8a8": lambda folder, threads: _load_opt_torch(folder, threads, quantize="w8a8"),
    "opt_flax_int8": lambda folder, threads: _load_opt_flax(folder, threads, quantize="int8"),
    "hf_torch": _load_hf_torch,
    "hf_tf": _load_hf_tf,
    "hf_flax": _load_hf_flax,
    "ct2_fp32": lambda folder, threads: _CT2(folder, threads, "float32"),
    "ct2_int8": lambda folder, threads: _CT2(folder, threads, "int8"),
    "ort_fp32": lambda folder, threads: _ORT(folder, threads, "fp32"),
    "ort_int8": lambda folder, threads: _ORT(folder, threads, "int8"),
}
FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "transformers", "ctranslate2", "onnxruntime", "numpy")
