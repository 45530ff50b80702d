"""The Hugging Face oracle: run by `.venv-oracle/bin/python` (transformers 4.57.6), never imported
by the project.

    python hf_oracle.py REQUEST.json

REQUEST.json:
    {"task": "checkpoint", "config": {...}, "seed": 0, "head": "causal_lm", "out": DIR,
     "formats": ["safetensors", "bin", "tf-h5", "flax-msgpack"], "dtype": "float32"}
        Builds Hugging Face's model for `head` from `config`, with its own init followed by seeded
        noise on every parameter (so biases and LayerNorms are not 0/1 and a loader that mixes them
        up fails), and saves it in each format with Hugging Face's own writers.
    {"task": "run", "model": DIR, "head": ..., "runs": [{"framework": "torch"|"tf"|"flax",
     "input_ids": [[...]], "attention_mask": [[...]], "generate": {...} or null,
     "hidden_states": bool, "dtype": "float32", "attn_implementation": "eager"|"sdpa",
     "generation_config": {field: value} (torch: set on model.generation_config before generate)}],
     "out": FILE.npz}
        Loads DIR with the framework's class and writes, per run i, `i/logits`, `i/hidden_states`
        (stacked), `i/start_logits`, `i/end_logits`, `i/sequences` into one .npz.
    {"task": "tokenize", "vocab_dir": DIR, "texts": [...], "out": FILE.json}
        Token ids from `GPT2Tokenizer` (OPT's class) for every text.
    {"task": "processors", "cases": [{"input_ids": [[...]], "scores": [[...]], "prompt_length": P,
     "processors": [["RepetitionPenaltyLogitsProcessor", {"penalty": 1.5}], ...]}], "out": FILE.npz}
        Applies Hugging Face's own logits processor / warper classes, in the order given, to float32
        `scores`; writes `i/scores` per case. MinNewTokensLengthLogitsProcessor gets
        `prompt_length_to_skip` from the case's prompt_length.
    {"task": "peft_logits", "model": DIR, "adapter": ADAPTER_DIR, "input_ids": [[...]],
     "attention_mask": [[...]], "out": FILE.npz}
        Loads DIR with OPTForCausalLM, applies the adapter with `peft.PeftModel.from_pretrained`
        and writes its float32 `logits`.
    {"task": "peft_adapter", "model": DIR, "lora": {"r", "lora_alpha", "target_modules", "use_rslora"},
     "seed": 0, "b_std": 0.1, "out": ADAPTER_DIR}
        Wraps DIR's OPTForCausalLM with `peft.get_peft_model` (PEFT's own init of A), sets every lora_B
        to seeded normal noise (PEFT initialises B to zero, which would hide a wrong A or scaling) and
        saves the adapter with PEFT's `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # HF's TF classes need Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

TORCH_CLASSES = {
    "base": "OPTModel",
    "causal_lm": "OPTForCausalLM",
    "sequence_classification": "OPTForSequenceClassification",
    "question_answering": "OPTForQuestionAnswering",
}
TF_CLASSES = {"base": "TFOPTModel", "causal_lm": "TFOPTForCausalLM"}
FLAX_CLASSES = {"base": "FlaxOPTModel", "causal_lm": "FlaxOPTForCausalLM"}


def _class(framework: str, head: str):
    import transformers

    table = {"torch": TORCH_CLASSES, "tf": TF_CLASSES, "flax": FLAX_CLASSES}[framework]
    if head not in table:
        raise SystemExit(f"Hugging Face has no {framework} class for head {head!r}")
    return getattr(transformers, table[head])


def _patch_init_for_affine_free_layer_norm() -> None:
    """HF 4.57.6 cannot build a model with `layer_norm_elementwise_affine=False`: its
    `_init_weights` fills `LayerNorm.weight`, which is None then. Skip such LayerNorms (they have
    nothing to initialise); every other module keeps HF's own init."""
    from torch import nn
    from transformers.models.opt import modeling_opt

    original = modeling_opt.OPTPreTrainedModel._init_weights

    def init_weights(self, module):
        if isinstance(module, nn.LayerNorm) and module.weight is None:
            return
        original(self, module)

    modeling_opt.OPTPreTrainedModel._init_weights = init_weights


def checkpoint(req: dict) -> None:
    import torch
    import transformers

    _patch_init_for_affine_free_layer_norm()
    torch.manual_seed(req["seed"])
    config = transformers.OPTConfig(**req["config"])
    model = _class("torch", req["head"])(config).eval()
    gen = torch.Generator().manual_seed(req["seed"] + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * req.get("noise", 0.02)
            if name.endswith("embed_tokens.weight"):
                noise[config.pad_token_id] = 0.0  # keep Hugging Face's zero padding row
            p.add_(noise)
    dtype = getattr(torch, req.get("dtype", "float32"))
    model = model.to(dtype)
    out = req["out"]
    formats = req.get("formats", ["safetensors"])
    if "safetensors" in formats:
        model.save_pretrained(out, safe_serialization=True)
    if "bin" in formats:
        model.save_pretrained(out, safe_serialization=False)
    if "tf-h5" in formats:
        tf_model = _class("tf", req["head"]).from_pretrained(out, from_pt=True)
        tf_model.save_pretrained(out)
    if "flax-msgpack" in formats:
        flax_model = _class("flax", req["head"]).from_pretrained(out, from_pt=True)
        flax_model.save_pretrained(out)
    if "safetensors" not in formats:
        os.remove(os.path.join(out, "model.safetensors"))


def _torch_run(folder: str, head: str, run: dict) -> dict:
    import torch

    dtype = getattr(torch, run.get("dtype", "float32"))
    cls = _class("torch", head)
    # 4.55 (the contrastive-search oracle) spells the keyword torch_dtype; 4.56 renamed it dtype.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    model = cls.from_pretrained(folder, attn_implementation=run.get("attn_implementation", "eager"), **dtype_kw).eval()
    ids = torch.tensor(run["input_ids"])
    mask = torch.tensor(run["attention_mask"]) if run.get("attention_mask") is not None else None
    res: dict = {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=run.get("hidden_states", False))
        for key in ("logits", "start_logits", "end_logits", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                res[key] = getattr(out, key).float().numpy()
        if run.get("hidden_states"):
            res.update({f"hidden_states.{j}": h.float().numpy() for j, h in enumerate(out.hidden_states)})
        if run.get("generate"):
            for key, value in (run.get("generation_config") or {}).items():
                setattr(model.generation_config, key, value)  # e.g. pad_token_id None: HF's own fallback
            seqs = model.generate(input_ids=ids, attention_mask=mask, **run["generate"])
            res["sequences"] = seqs.numpy()
    return res


def _tf_run(folder: str, head: str, run: dict) -> dict:
    import tensorflow as tf

    # Read the folder's own tf_model.h5 when it has one; otherwise convert from the torch weights.
    # (Without from_pt, 4.57.6 chokes on safetensors 0.8's safe_open when no .h5 is present.)
    if os.path.isfile(os.path.join(folder, "tf_model.h5")):
        model = _class("tf", head).from_pretrained(folder, use_safetensors=False)
    else:
        model = _class("tf", head).from_pretrained(folder, from_pt=True)
    ids = tf.constant(run["input_ids"])
    mask = tf.constant(run["attention_mask"]) if run.get("attention_mask") is not None else None
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=run.get("hidden_states", False))
    res: dict = {}
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            res[key] = getattr(out, key).numpy()
    if run.get("hidden_states"):
        res.update({f"hidden_states.{j}": h.numpy() for j, h in enumerate(out.hidden_states)})
    if run.get("generate"):
        res["sequences"] = model.generate(input_ids=ids, attention_mask=mask, **run["generate"]).numpy()
    return res


def _flax_run(folder: str, head: str, run: dict) -> dict:
    import jax.numpy as jnp

    has_msgpack = os.path.isfile(os.path.join(folder, "flax_model.msgpack"))
    model = _class("flax", head).from_pretrained(folder, from_pt=not has_msgpack)
    ids = jnp.asarray(run["input_ids"])
    mask = jnp.asarray(run["attention_mask"]) if run.get("attention_mask") is not None else None
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=run.get("hidden_states", False))
    res: dict = {}
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            res[key] = np.asarray(getattr(out, key))
    if run.get("hidden_states"):
        res.update({f"hidden_states.{j}": np.asarray(h) for j, h in enumerate(out.hidden_states)})
    if run.get("generate"):
        res["sequences"] = np.asarray(model.generate(input_ids=ids, attention_mask=mask, **run["generate"]).sequences)
    return res


def run(req: dict) -> None:
    runners = {"torch": _torch_run, "tf": _tf_run, "flax": _flax_run}
    arrays = {}
    for i, r in enumerate(req["runs"]):
        for key, value in runners[r["framework"]](req["model"], req["head"], r).items():
            arrays[f"{i}/{key}"] = value
    np.savez(req["out"], **arrays)


def tokenize(req: dict) -> None:
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(req["vocab_dir"], add_bos_token=True, bos_token="</s>", unk_token="</s>",
                                        eos_token="</s>", pad_token="<pad>")
    ids = [tok(t)["input_ids"] for t in req["texts"]]
    with open(req["out"], "w") as f:
        json.dump(ids, f)


def processors(req: dict) -> None:
    import torch
    from transformers.generation import logits_process

    arrays = {}
    for i, case in enumerate(req["cases"]):
        ids = torch.tensor(case["input_ids"], dtype=torch.long)
        scores = torch.tensor(case["scores"], dtype=torch.float32)
        for name, kwargs in case["processors"]:
            if name == "MinNewTokensLengthLogitsProcessor":
                kwargs = {"prompt_length_to_skip": case["prompt_length"], **kwargs}
            scores = getattr(logits_process, name)(**kwargs)(ids, scores)
        arrays[f"{i}/scores"] = scores.numpy()
    np.savez(req["out"], **arrays)


def peft_logits(req: dict) -> None:
    import torch
    from peft import PeftModel

    base = _class("torch", "causal_lm").from_pretrained(req["model"], attn_implementation="eager")
    model = PeftModel.from_pretrained(base, req["adapter"]).eval()
    ids = torch.tensor(req["input_ids"])
    mask = torch.tensor(req["attention_mask"]) if req.get("attention_mask") is not None else None
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    np.savez(req["out"], logits=logits.float().numpy())


def peft_adapter(req: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(req["seed"])
    base = _class("torch", "causal_lm").from_pretrained(req["model"], attn_implementation="eager")
    lora = req["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"],
                        use_rslora=lora.get("use_rslora", False), lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(req["seed"] + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * req.get("b_std", 0.1))
    model.save_pretrained(req["out"])


def main() -> None:
    with open(sys.argv[1]) as f:
        req = json.load(f)
    {"checkpoint": checkpoint, "run": run, "tokenize": tokenize, "processors": processors,
     "peft_logits": peft_logits, "peft_adapter": peft_adapter}[req["task"]](req)


if __name__ == "__main__":
    main()
