"""Loading and saving, written once and run on every backend (the `backend` fixture): Hugging
Face-written folders in every format, the key-prefix variants, sharded safetensors and
.bin, strict key accounting, pickles that are refused, missing files, a language model loaded into a
task head, dtypes, `save_pretrained`'s written paths and exact round trips of every head.

What one backend alone has stays in its own file: torch's tied lm_head *identity*, `torch.dtype`
and device arguments, the loading peak RSS and "Hugging Face torch loads our sharded folder"; TF's
float64 refusal; Flax's "Hugging Face Flax loads our msgpack".
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from opt_core import CheckpointError
from opt_core.params import Head, hf_name, parameter_table
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from tests.golden import hf_golden
from tests.variants import CORE_VARIANTS, TOLERANCE, VARIANTS, left_padded_batch, relative_error

# Each backend's own Hugging Face format, read and written beside safetensors.
NATIVE = {"torch": "bin", "tf": "tf-h5", "flax": "flax-msgpack"}
FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "tf-h5": "tf_model.h5",
         "flax-msgpack": "flax_model.msgpack"}


def _logits(backend, model, ids, mask):
    return backend.forward(model, ids, attention_mask=mask)["logits"]


def _only(folder, out, *names):
    """A copy of `folder` at `out` holding config.json and the named files only."""
    out.mkdir()
    for name in ("config.json", *names):
        shutil.copy(folder / name, out / name)
    return out


def _golden_tensors(variant):
    g = hf_golden(variant)
    return g, load_file(str(g.folder / "model.safetensors"))


def _assert_holds_the_file(backend, model, tensors, what):
    """`model`'s parameters are the Hugging Face file's tensors, bit for bit (`tensors` by HF key)."""
    got = backend.params(model)
    want = {k.removeprefix("model."): v for k, v in tensors.items() if k != "lm_head.weight"}
    assert set(got) == set(want), what
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=f"{what}: {name}")


def _stored_dtype(backend, model):
    return backend.io.canonical_tensors(model)["decoder.embed_tokens.weight"].dtype.name


# ---------------------------------------------------------------- Hugging Face-written folders
@pytest.mark.oracle
@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_hf_written_checkpoints_match_hf_logits(backend, variant, tmp_path):
    """Every file Hugging Face wrote (safetensors, .bin, tf_model.h5, flax_model.msgpack; the
    oracle writes no tf_model.h5 where Hugging Face TF cannot build the variant), each alone in a
    folder, loads Hugging Face's tensors bit for bit, and the model gives Hugging Face's logits
    (torch's and Flax's); the tied lm_head is the embedding whether the file leaves it out
    (safetensors) or keeps it (.bin)."""
    g, tensors = _golden_tensors(variant)
    formats = [fmt for fmt, name in FILES.items() if (g.folder / name).is_file()]
    assert {"safetensors", NATIVE[backend.name]} <= set(formats), formats
    for fmt in formats:
        model = backend.load(Head.CAUSAL_LM, _only(g.folder, tmp_path / fmt, FILES[fmt]))
        _assert_holds_the_file(backend, model, tensors, fmt)
        assert model.loading_info.tied == ["lm_head.weight"], fmt
        assert backend.lm_head_is_embedding(model), fmt
    logits = _logits(backend, model, g.ids, g.mask)  # the same parameters from every file
    assert relative_error(logits, g.torch["logits"], g.mask) < TOLERANCE["float32"]
    assert relative_error(logits, g.flax["logits"], g.mask) < TOLERANCE["float32"]


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_bare_prefix_and_explicit_lm_head(backend, variant, tmp_path):
    g, tensors = _golden_tensors(variant)
    bare = {k.removeprefix("model."): v for k, v in tensors.items()}  # `decoder.*`, as the 350m file
    with_head = dict(tensors, **{"lm_head.weight": tensors["model.decoder.embed_tokens.weight"]})
    for name, state in (("bare", bare), ("with_head", with_head)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(g.folder / "config.json", folder)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        _assert_holds_the_file(backend, backend.load(Head.CAUSAL_LM, folder), tensors, name)
    # The bare decoder reads both prefixes too, and leaves the head it has no use for.
    base = backend.load(Head.BASE, tmp_path / "with_head")
    assert base.loading_info.ignored == ["lm_head.weight"]


def _write_sharded_bin(folder, config_folder, tensors):
    """Two .bin shards and their index, as older Hugging Face releases wrote them."""
    import torch

    folder.mkdir()
    shutil.copy(config_folder / "config.json", folder)
    keys = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        torch.save({k: torch.from_numpy(tensors[k]) for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.oracle
def test_sharded_safetensors_and_sharded_bin(backend, tmp_path):
    g, tensors = _golden_tensors("post_ln_proj")
    model = backend.load(Head.CAUSAL_LM, g.folder)
    backend.save(model, tmp_path / "st", max_shard_size=20_000)
    shards = sorted(p.name for p in (tmp_path / "st").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "st" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "st" / "model.safetensors").exists()
    again = backend.load(Head.CAUSAL_LM, tmp_path / "st")
    assert relative_error(_logits(backend, again, g.ids, g.mask), g.torch["logits"], g.mask) < TOLERANCE["float32"]
    before, after = backend.params(model), backend.params(again)
    assert list(before) == list(after)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)

    from_bin = backend.load(Head.CAUSAL_LM, _write_sharded_bin(tmp_path / "bin", g.folder, tensors))
    _assert_holds_the_file(backend, from_bin, tensors, "sharded .bin")


@pytest.mark.oracle
def test_sharded_bin_reader_reads_every_tensor(tmp_path):
    """The reader under every backend's .bin loading (no backend needed): shapes and bits."""
    from opt_core.formats.torch_bin import TorchBinReader

    g, tensors = _golden_tensors("post_ln_proj")
    with TorchBinReader(_write_sharded_bin(tmp_path / "bin", g.folder, tensors)) as reader:
        assert reader.shapes() == {k: v.shape for k, v in tensors.items()}
        assert all(np.array_equal(reader.read(k), tensors[k]) for k in tensors)


# ---------------------------------------------------------------- bad and missing files
def _saved_lm(backend, folder, variant="pre_ln"):
    config = VARIANTS[variant]
    params = random_parameters(config, Head.CAUSAL_LM, std=0.5)
    model = backend.build(config, Head.CAUSAL_LM, params)
    return model, params, backend.save(model, folder)


def test_bad_checkpoints_list_every_problem(backend, tmp_path):
    _saved_lm(backend, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.decoder.layers.1.fc2.bias"]
    tensors["model.decoder.layers.0.self_attn.qkj_proj.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.decoder.layers.0.fc1.weight"] = tensors["model.decoder.layers.0.fc1.weight"][:, :-1].copy()
    tensors["model.decoder.layers.1.fc1.weight"] = tensors["model.decoder.layers.1.fc1.weight"].T.copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        backend.load(Head.CAUSAL_LM, tmp_path)
    text = str(err.value)
    assert "missing tensors (1): decoder.layers.1.fc2.bias" in text
    assert "unexpected tensors (1): model.decoder.layers.0.self_attn.qkj_proj.weight" in text
    assert "wrong shape: model.decoder.layers.0.fc1.weight is [64, 31], the config implies [64, 32]" in text
    assert "wrong shape: model.decoder.layers.1.fc1.weight is [32, 64], the config implies [64, 32]" in text


def test_unsafe_pickles_are_refused(backend, tmp_path):
    import datetime

    import torch

    VARIANTS["pre_ln"].save_pretrained(tmp_path)
    # An arbitrary object needs a global the restricted unpickler refuses to import.
    torch.save({"model.decoder.embed_tokens.weight": datetime.date(2020, 1, 1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="asks for datetime.date; only tensors"):
        backend.load(Head.CAUSAL_LM, tmp_path)
    torch.save({"model.decoder.embed_tokens.weight": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="entries that are not tensors"):
        backend.load(Head.CAUSAL_LM, tmp_path)


def test_missing_folder_config_weights_and_unknown_dtype(backend, tmp_path):
    with pytest.raises(FileNotFoundError):
        backend.load(Head.CAUSAL_LM, tmp_path / "nowhere")
    _saved_lm(backend, tmp_path / "ok")
    with pytest.raises(ValueError, match="unknown dtype"):
        backend.load(Head.CAUSAL_LM, tmp_path / "ok", dtype="float8")
    VARIANTS["pre_ln"].save_pretrained(tmp_path / "empty")
    for head in (Head.CAUSAL_LM, Head.BASE):
        with pytest.raises(FileNotFoundError, match="holds no OPT weights"):
            backend.load(head, tmp_path / "empty")
    (tmp_path / "empty" / "tf_model.h5").write_bytes(b"")  # every format is read: an empty one is refused
    with pytest.raises(CheckpointError, match="tf_model.h5"):
        backend.load(Head.CAUSAL_LM, tmp_path / "empty")


# ---------------------------------------------------------------- a language model into other heads
HEAD_WEIGHTS = {Head.SEQUENCE_CLASSIFICATION: ["score.weight"],
                Head.QUESTION_ANSWERING: ["qa_outputs.weight", "qa_outputs.bias"]}


def test_base_checkpoint_into_a_task_head_initialises_it(backend, tmp_path, caplog):
    config = VARIANTS["post_ln_proj"]
    _, params, _ = _saved_lm(backend, tmp_path, "post_ln_proj")
    ids, mask = left_padded_batch(config.vocab_size)
    # The bare decoder: nothing left unread, nothing new.
    base = backend.load(Head.BASE, tmp_path)
    assert base.loading_info.ok and base.loading_info.ignored == [] and not base.loading_info.new_head
    hidden = backend.forward(base, ids, attention_mask=mask)["last_hidden_state"]
    for head, weights in HEAD_WEIGHTS.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model = backend.load(head, tmp_path)
        assert model.loading_info.new_head == weights and "initialised" in caplog.text, head
        assert model.loading_info.ignored == [], head  # the tied lm_head is not in the file
        got = backend.params(model)
        assert 0 < got[weights[0]].std() < 3 * config.init_std, head
        for name in ("decoder.embed_tokens.weight", "decoder.layers.0.fc1.weight"):
            np.testing.assert_array_equal(got[name], params[name], err_msg=f"{head} {name}")
        # The task head's decoder gives the bare decoder's hidden states.
        np.testing.assert_array_equal(backend.forward(model.model, ids, attention_mask=mask)["last_hidden_state"],
                                      hidden, err_msg=str(head))
        out = backend.forward(model, ids, attention_mask=mask)
        if head is Head.SEQUENCE_CLASSIFICATION:
            assert out["logits"].shape == (3, config.num_labels)
        else:
            assert out["start_logits"].shape == out["end_logits"].shape == ids.shape


# ---------------------------------------------------------------- dtypes and written paths
def test_dtypes_and_written_paths(backend, tmp_path):
    """`dtype="auto"/"float16"/"fp16"/"bfloat16"/"bf16"` (bf16 logits within bf16's tolerance
    of the float64 reference); `save_pretrained` returns the written paths, config.json first, and
    records the one dtype the weights are stored in."""
    config = VARIANTS["pre_ln"]
    _, _, written = _saved_lm(backend, tmp_path / "src")
    assert [p.name for p in written] == ["config.json", "model.safetensors", "generation_config.json"]
    assert all(p.parent == tmp_path / "src" and p.is_file() for p in written)
    saved = json.loads((tmp_path / "src" / "config.json").read_text())
    assert saved["architectures"] == ["OPTForCausalLM"] and saved["torch_dtype"] == "float32"
    ids, mask = left_padded_batch(config.vocab_size)
    want = ReferenceOPTForCausalLM.from_pretrained(tmp_path / "src")(ids, mask).logits
    for dtype, stored in (("auto", "float32"), ("float16", "float16"), ("fp16", "float16"),
                          ("bfloat16", "bfloat16"), ("bf16", "bfloat16")):
        model = backend.load(Head.CAUSAL_LM, tmp_path / "src", dtype=dtype)
        assert _stored_dtype(backend, model) == stored, dtype
        if dtype == "bfloat16":  # torch's own test checks its float16 and float32 logits too
            err = relative_error(_logits(backend, model, ids, mask), want, mask)
            assert err < TOLERANCE[stored], (dtype, err)
    half = backend.load(Head.CAUSAL_LM, tmp_path / "src", dtype="bf16")
    written = half.save_pretrained(tmp_path / "half")
    assert [p.name for p in written] == ["config.json", "model.safetensors", "generation_config.json"]
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _stored_dtype(backend, backend.load(Head.CAUSAL_LM, tmp_path / "half", dtype="auto")) == "bfloat16"


# ---------------------------------------------------------------- exact round trips
@pytest.mark.parametrize("head", list(Head), ids=lambda h: h.value)
def test_save_load_round_trip_is_exact(backend, head, tmp_path):
    """Every head saved in safetensors and the backend's own format reloads bit for bit from
    either, under Hugging Face's names (the tied lm_head left out) and class name."""
    # post-LN with projections and no LayerNorm weights: every optional key group present or absent.
    config = VARIANTS["post_ln_proj"].replace(layer_norm_elementwise_affine=False, num_labels=3)
    params = random_parameters(config, head, std=0.5)
    model = backend.build(config, head, params)
    native = NATIVE[backend.name]
    written = backend.save(model, tmp_path, formats=["safetensors", native])
    assert [p.name for p in written][:3] == ["config.json", FILES["safetensors"], FILES[native]]
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == {hf_name(s.name, head) for s in parameter_table(config, head) if s.tied_to is None}
    prefix = "" if head is Head.BASE else "model."
    assert f"{prefix}decoder.layers.0.fc1.weight" in saved and "lm_head.weight" not in saved
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [backend.model_class(head).__name__]
    ids, mask = left_padded_batch(config.vocab_size)
    out = backend.forward(model, ids, attention_mask=mask)
    # torch lays out its GEMMs at load time (fused qkv, input-major weights: opt_torch.kernels), so
    # a loaded model sums in another order than the one built in memory.
    for fmt in ("safetensors", native):
        again = backend.load(head, tmp_path, format=fmt)
        assert again.loading_info.ok and not again.loading_info.new_head, fmt
        assert Head(again.head) is head
        got = backend.params(again)
        assert list(got) == [s.name for s in parameter_table(config, head) if s.tied_to is None]
        for name, value in got.items():
            np.testing.assert_array_equal(value, params[name], err_msg=f"{fmt} {name}")
        if fmt != "safetensors":
            continue  # the same parameters as the safetensors load (checked above), so the same outputs
        again_out = backend.forward(again, ids, attention_mask=mask)
        for key in out:
            if backend.name == "torch":
                assert relative_error(again_out[key], out[key]) < TOLERANCE["float32"], (fmt, key)
            else:
                np.testing.assert_array_equal(again_out[key], out[key], err_msg=f"{fmt} {key}")
    if head is Head.CAUSAL_LM:  # the float64 reference reads what we wrote
        ref = ReferenceOPTForCausalLM.from_pretrained(tmp_path)(ids, mask)
        assert relative_error(out["logits"], ref.logits, mask) < TOLERANCE["float32"]
