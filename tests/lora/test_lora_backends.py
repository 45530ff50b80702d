"""LoRA in torch, TF and Flax against PEFT (pinned in the oracle environment) and against each other.

One tiny base model (torch init, seed 0, saved as a Hugging Face folder); in every backend the same
adapter (seed 0: A from `opt_core.lora`'s counter stream, B = 0) trains 30 steps on the same batches
(`opt_core.training`'s seeded stream). Each backend's run is done once per session and shared by the
tests below (TF and Flax compile their training step once).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opt_core.data import TextDataset
from opt_core.lora import LoraConfig
from opt_core.params import Head
from opt_verify.training_curves import CURVE_ARGS, TINY_TRAIN, affine_blocks
from tests.backends import get_backend
from tests.lora.peft_oracle import oracle_peft_adapter, oracle_peft_logits
from tests.variants import left_padded_batch, relative_error

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]

# q_proj/v_proj (PEFT's default) plus fc1, whose [ffn, hidden] shape is not square, so a transposed
# A or B cannot go unnoticed.
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "fc1"))
# The full fine-tuning curve setup, with the higher learning rate adapters want.
LORA_ARGS = dataclasses.replace(CURVE_ARGS, learning_rate=3e-2)
# Same seed, same run: the bound, relative to the loss (~4.9 nats here).
CURVE_RELATIVE = 1e-5
# Logits against PEFT / after merging: float32 through a tiny model, max |diff| / max |logit|.
LOGITS_RELATIVE = 1e-5
BACKENDS = ("torch", "tf", "flax")


@functools.cache
def base_folder() -> Path:
    import torch

    from opt_torch import OPTForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="lora-base-"))
    torch.manual_seed(0)
    OPTForCausalLM(TINY_TRAIN).save_pretrained(folder)
    return folder


def lora_module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"opt_{name}.lora")


def base_snapshot(name: str, model: Any) -> dict[str, np.ndarray]:
    """Every parameter that is not an adapter matrix, by the framework's own name (without the
    `base_layer` step a wrapped layer adds)."""
    if name == "torch":
        return {n.replace(".base_layer", ""): p.detach().numpy().copy()
                for n, p in model.named_parameters() if ".lora_" not in n}
    if name == "tf":
        return {v.path: v.numpy().copy() for v in model.weights if "lora_" not in v.path}
    from flax import nnx

    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {"/".join(str(p) for p in k if p != "base_layer"): np.array(v.get_value())
            for k, v in nnx.to_flat_state(state)}


def optimizer_tensor_shapes(name: str, model: Any) -> list[tuple[int, ...]]:
    """The shapes of the non-scalar tensors the backend's training optimiser holds for `model`."""
    training = get_backend(name).training
    if name == "torch":
        opt = training.make_training_optimizer(model, LORA_ARGS)
        return [tuple(p.shape) for g in opt.param_groups for p in g["params"]]
    if name == "tf":
        opt = training.make_training_optimizer(model, LORA_ARGS)
        opt.build(model.trainable_variables)
        return [tuple(v.shape) for v in opt.variables if len(v.shape) > 0]
    import jax
    from flax import nnx

    opt = training.make_training_optimizer(model, LORA_ARGS)
    return [tuple(x.shape) for x in jax.tree.leaves(nnx.state(opt.opt_state)) if np.ndim(x) > 0]


@functools.cache
def lora_run(name: str) -> dict[str, Any]:
    """Add the seeded adapter, train it, save it, merge it: everything the tests look at."""
    backend, lora = get_backend(name), lora_module(name)
    model = backend.load(Head.CAUSAL_LM, base_folder())
    ids, mask = left_padded_batch(TINY_TRAIN.vocab_size)
    before = base_snapshot(name, model)
    lora.add_adapter(model, LORA, seed=0)
    untrained = lora.adapter_weights(model)
    optimizer_shapes = optimizer_tensor_shapes(name, model)
    losses = backend.training.train_causal_lm(model, TextDataset(affine_blocks()), LORA_ARGS, log=None).losses
    after = base_snapshot(name, model)
    trained = lora.adapter_weights(model)
    adapter = Path(tempfile.mkdtemp(prefix=f"lora-{name}-"))
    lora.save_adapter(model, adapter)
    logits = backend.forward(model, ids, attention_mask=mask)["logits"]
    lora.merge_adapter(model)
    merged_in_place = backend.forward(model, ids, attention_mask=mask)["logits"]
    lora.unmerge_adapter(model)
    unmerged = backend.forward(model, ids, attention_mask=mask)["logits"]
    plain = lora.merge_and_unload(model)
    merged_folder = Path(tempfile.mkdtemp(prefix=f"lora-merged-{name}-"))
    backend.save(plain, merged_folder)
    reloaded = backend.forward(backend.load(Head.CAUSAL_LM, merged_folder), ids, attention_mask=mask)["logits"]
    return dict(losses=losses, before=before, after=after, untrained=untrained, trained=trained, adapter=adapter,
                logits=logits, merged_in_place=merged_in_place, unmerged=unmerged, reloaded=reloaded,
                optimizer_shapes=optimizer_shapes, ids=ids, mask=mask)


def adapter_shapes() -> list[tuple[int, ...]]:
    c, f, r = TINY_TRAIN.hidden_size, TINY_TRAIN.ffn_dim, LORA.r
    per_layer = {"q_proj": [(r, c), (c, r)], "v_proj": [(r, c), (c, r)], "fc1": [(r, c), (f, r)]}
    return [s for _ in range(TINY_TRAIN.num_hidden_layers) for m in LORA.target_modules for s in per_layer[m]]


@pytest.mark.parametrize("name", BACKENDS)
def test_only_the_adapter_trains(name):
    run = lora_run(name)
    # It really trains: rank-4 adapters on a random 2-layer base move the loss by ~0.14 in 30 steps,
    # while batch-to-batch noise is ~0.05.
    assert run["losses"][-1] < run["losses"][0] - 0.1, run["losses"]
    assert run["before"].keys() == run["after"].keys() and run["before"]
    for key, value in run["before"].items():
        np.testing.assert_array_equal(run["after"][key], value, err_msg=f"{name}: frozen {key} changed")
    for key, (a, b) in run["trained"].items():
        assert np.abs(b).max() > 0, f"{name}: B of {key} never left zero"
        assert not np.array_equal(a, run["untrained"][key][0]), f"{name}: A of {key} never moved"
    # torch lists each trained parameter once; Keras and optax hold Adam's two moments per tensor,
    # in the kernel layout ([in, r], [r, out]).
    got = sorted(run["optimizer_shapes"])
    want = sorted(adapter_shapes()) if name == "torch" else sorted([s[::-1] for s in adapter_shapes()] * 2)
    assert got == want, f"{name}: optimiser holds {got}"


def test_one_seed_traces_one_loss_curve_in_three_backends():
    ref = np.asarray(lora_run("torch")["losses"])
    assert len(ref) == LORA_ARGS.max_steps == 30
    for name in ("tf", "flax"):
        rel = np.abs(np.asarray(lora_run(name)["losses"]) - ref) / ref
        assert rel.max() <= CURVE_RELATIVE, f"{name} vs torch: {rel.tolist()}"


def test_one_seed_gives_one_initial_adapter_in_three_backends():
    ref = lora_run("torch")["untrained"]
    for name in ("tf", "flax"):
        got = lora_run(name)["untrained"]
        assert got.keys() == ref.keys()
        for key in ref:
            np.testing.assert_array_equal(got[key][0], ref[key][0])
            np.testing.assert_array_equal(got[key][1], 0.0)


@pytest.mark.parametrize("name", BACKENDS)
def test_adapter_trained_here_gives_peft_the_same_logits(name):
    run = lora_run(name)
    theirs = oracle_peft_logits(base_folder(), run["adapter"], run["ids"], run["mask"])
    assert relative_error(run["logits"], theirs, run["mask"]) <= LOGITS_RELATIVE


@pytest.mark.parametrize("name", BACKENDS)
def test_merge_gives_the_adapter_models_logits(name):
    run = lora_run(name)
    m = run["mask"]
    assert relative_error(run["merged_in_place"], run["logits"], m) <= LOGITS_RELATIVE
    assert relative_error(run["unmerged"], run["logits"], m) <= LOGITS_RELATIVE
    # merge_and_unload -> save_pretrained -> from_pretrained: an ordinary folder with the adapter inside
    assert relative_error(run["reloaded"], run["logits"], m) <= LOGITS_RELATIVE


PEFT_LORA = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "out_proj", "fc2"], "use_rslora": True}


@pytest.mark.parametrize("name", BACKENDS)
def test_adapter_written_by_peft_loads_here(name, tmp_path):
    backend, lora = get_backend(name), lora_module(name)
    folder = oracle_peft_adapter(base_folder(), PEFT_LORA, seed=0)
    ids, mask = left_padded_batch(TINY_TRAIN.vocab_size)
    model = lora.load_adapter(backend.load(Head.CAUSAL_LM, base_folder()), folder)
    config = lora.adapter_config(model)
    assert config.use_rslora and config.scaling == pytest.approx(16 / 2)
    ours = backend.forward(model, ids, attention_mask=mask)["logits"]
    theirs = oracle_peft_logits(base_folder(), folder, ids, mask)
    base = backend.forward(backend.load(Head.CAUSAL_LM, base_folder()), ids, attention_mask=mask)["logits"]
    assert relative_error(base, theirs, mask) > 100 * LOGITS_RELATIVE  # the adapter really matters
    assert relative_error(ours, theirs, mask) <= LOGITS_RELATIVE
    # and it goes back out unchanged
    copy = tmp_path / "again"
    lora.save_adapter(model, copy)
    from safetensors.numpy import load_file

    want, got = load_file(str(folder / "adapter_model.safetensors")), load_file(str(copy / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    shutil.rmtree(copy)


@pytest.mark.parametrize("name", BACKENDS)
def test_save_pretrained_refuses_a_model_that_still_carries_an_adapter(name, tmp_path):
    """Writing the base alone would silently drop the adapter: save_adapter or merge_and_unload first."""
    backend, lora = get_backend(name), lora_module(name)
    model = lora.add_adapter(backend.load(Head.CAUSAL_LM, base_folder()), LORA)
    with pytest.raises(KeyError, match="v_proj"):
        backend.save(model, tmp_path)


def test_greedy_generation_with_an_adapter_is_the_same_in_three_backends(tmp_path):
    """generate() runs through the adapter (TF and Flax compile their decoding loops) in every backend."""
    from opt_core.lora import init_adapter, linear_shapes, save_adapter_files

    config = LoraConfig(r=8, lora_alpha=8, target_modules=("q_proj", "v_proj", "fc2"))
    rng = np.random.default_rng(1)
    shapes = linear_shapes(TINY_TRAIN.hidden_size, TINY_TRAIN.ffn_dim)
    start = init_adapter(config, TINY_TRAIN.num_hidden_layers, shapes, seed=1)
    weights = {k: (a, rng.normal(0, 0.3, b.shape).astype(np.float32)) for k, (a, b) in start.items()}
    save_adapter_files(tmp_path, config, weights)
    ids = np.array([[2, 5, 9, 17, 33]])
    runs = {}
    for name in BACKENDS:
        backend, lora = get_backend(name), lora_module(name)
        model = lora.load_adapter(backend.load(Head.CAUSAL_LM, base_folder()), tmp_path)
        runs[name] = np.asarray(model.generate(ids, attention_mask=np.ones_like(ids), max_new_tokens=12,
                                               do_sample=False))
    plain = get_backend("torch").load(Head.CAUSAL_LM, base_folder())
    base = np.asarray(plain.generate(ids, attention_mask=np.ones_like(ids), max_new_tokens=12, do_sample=False))
    assert not np.array_equal(runs["torch"], base)  # the adapter changes the text
    for name in ("tf", "flax"):
        np.testing.assert_array_equal(runs[name], runs["torch"], err_msg=name)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_float64_reference_with_the_adapter_merged_in_agrees(name):
    """`opt_core.lora.merge_into_parameters` (what `opt verify --adapter` gives the reference) against
    the backend's own LoRA layers, on PEFT's adapter."""
    from opt_core.lora import load_adapter_files, merge_into_parameters
    from opt_core.reference import ReferenceOPTForCausalLM

    backend, lora = get_backend(name), lora_module(name)
    folder = oracle_peft_adapter(base_folder(), PEFT_LORA, seed=0)
    ids, mask = left_padded_batch(TINY_TRAIN.vocab_size)
    ref = ReferenceOPTForCausalLM.from_pretrained(base_folder())
    plain = ref(ids, mask).logits
    ref.params = merge_into_parameters(ref.params, *load_adapter_files(folder, TINY_TRAIN.num_hidden_layers))
    merged = ref(ids, mask).logits
    ours = backend.forward(lora.load_adapter(backend.load(Head.CAUSAL_LM, base_folder()), folder), ids,
                           attention_mask=mask)["logits"]
    assert relative_error(plain, merged, mask) > 100 * LOGITS_RELATIVE
    assert relative_error(ours, merged, mask) <= LOGITS_RELATIVE


@pytest.mark.parametrize("name", BACKENDS)
def test_refusals_leave_the_model_as_it_was(name):
    backend, lora = get_backend(name), lora_module(name)
    quantized = backend.load(Head.CAUSAL_LM, base_folder(), quantize="int8")
    with pytest.raises(ValueError, match="LoRA needs"):
        lora.add_adapter(quantized, LORA)
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        lora.adapter_config(quantized)
    model = lora.add_adapter(backend.load(Head.CAUSAL_LM, base_folder()), LORA)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_adapter(model, LORA)


@pytest.mark.parametrize("name", BACKENDS)
def test_lora_dropout_acts_in_training_only(name):
    backend, lora = get_backend(name), lora_module(name)
    config = LoraConfig(r=4, lora_dropout=0.5, target_modules=("q_proj", "fc1"))
    folder = Path(tempfile.mkdtemp(prefix="lora-dropout-"))
    shapes = {"q_proj": (32, 32), "fc1": (64, 32)}
    from opt_core.lora import init_adapter, save_adapter_files

    start = init_adapter(config, TINY_TRAIN.num_hidden_layers, shapes, seed=0)
    save_adapter_files(folder, config, {k: (a, np.ones_like(b)) for k, (a, b) in start.items()})
    model = lora.load_adapter(backend.load(Head.CAUSAL_LM, base_folder()), folder)
    ids = np.array([[2, 5, 6, 7, 8]])

    def logits(training: bool) -> np.ndarray:
        if name == "tf":
            return np.asarray(model(input_ids=ids, training=training).logits)
        model.train() if training else model.eval()
        try:
            out = model(backend.tensor(ids)).logits
            return out.detach().numpy() if name == "torch" else np.asarray(out)
        finally:
            model.eval()

    assert np.abs(logits(True) - logits(True)).max() > 0  # fresh masks each call
    np.testing.assert_array_equal(logits(False), logits(False))
    shutil.rmtree(folder)
