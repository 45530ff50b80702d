"""opt_core.formats.tf_h5 against files Hugging Face 4.57.6 wrote, and Hugging Face reading ours."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from opt_core import CheckpointError, OPTConfig, account_keys
from opt_core.checkpoint import iter_safetensors, weight_files
from opt_core.formats.tf_h5 import canonical_from_tf, read_tf_h5, tf_h5_shapes, tf_name, write_tf_h5
from opt_core.params import Head, canonical_name, parameter_table
from opt_core.reference import random_parameters
from tests.golden import golden_checkpoint, hf_golden
from tests.oracle import oracle_run
from tests.variants import TINY, TOLERANCE, VARIANTS, relative_error

pytestmark = pytest.mark.tf


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head", [h.value for h in Head])
def test_names_round_trip(variant, head):
    for spec in parameter_table(VARIANTS[variant], head):
        assert canonical_from_tf(tf_name(spec.name)) == spec.name


def test_foreign_names_are_not_mapped():
    for path in ("model/decoder/layers.0/self_attn/q_proj/weird:0", "lm_head/kernel:0", "other/x:0",
                 "model/decoder/layers.x/fc1/kernel:0", "model/decoder/embed_tokens/embeddings:0"):
        assert canonical_from_tf(path) is None, path


def _hf_layout(path):
    out = []
    with h5py.File(path, "r") as f:
        out.append(("/", sorted((k, str(v)) for k, v in f.attrs.items())))
        f.visititems(lambda name, obj: out.append(
            (name, sorted((k, str(v)) for k, v in obj.attrs.items()), getattr(obj, "shape", None),
             str(getattr(obj, "dtype", "")))))
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_file_reads_like_safetensors_and_rewrites_identically(variant, tmp_path):
    folder = golden_checkpoint(variant)
    cfg = VARIANTS[variant]
    shapes = tf_h5_shapes(folder / "tf_model.h5", cfg)
    acc = account_keys(shapes, cfg, Head.CAUSAL_LM)
    acc.raise_for_errors("hf tf_model.h5")
    assert acc.tied == ["lm_head.weight"]
    st = {canonical_name(k): a for k, a in iter_safetensors(weight_files(folder, "safetensors"))}
    tf = dict(read_tf_h5(folder / "tf_model.h5", config=cfg))
    assert set(tf) == set(st) - {"lm_head.weight"}
    for name, arr in tf.items():
        np.testing.assert_array_equal(arr, st[name], err_msg=name)
    write_tf_h5(tmp_path / "tf_model.h5", tf, cfg, Head.CAUSAL_LM)
    assert _hf_layout(tmp_path / "tf_model.h5") == _hf_layout(folder / "tf_model.h5")
    for name, arr in read_tf_h5(tmp_path / "tf_model.h5", config=cfg):
        np.testing.assert_array_equal(arr, st[name], err_msg=name)
    with h5py.File(tmp_path / "tf_model.h5", "r") as ours, h5py.File(folder / "tf_model.h5", "r") as hf:
        hf.visititems(lambda name, obj: np.testing.assert_array_equal(ours[name][()], obj[()])
                      if isinstance(obj, h5py.Dataset) else None)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("head", [h.value for h in Head])
def test_write_read_every_head_bit_exact(head, tmp_path):
    cfg = VARIANTS["pre_ln_proj"].replace(tie_word_embeddings=True)
    params = random_parameters(cfg, head, seed=1)
    stored = {k: v for k, v in params.items() if not (head == "causal_lm" and k == "lm_head.weight")}
    write_tf_h5(tmp_path / "tf_model.h5", stored, cfg, head)
    got = dict(read_tf_h5(tmp_path / "tf_model.h5"))
    assert set(got) == set(stored)
    for k, v in stored.items():
        np.testing.assert_array_equal(got[k], v)
    account_keys(tf_h5_shapes(tmp_path / "tf_model.h5"), cfg, head).raise_for_errors("ours")


def test_long_name_lists_are_chunked_like_keras(tmp_path):
    cfg = OPTConfig(**{**TINY, "hidden_size": 4, "ffn_dim": 4, "num_attention_heads": 1, "num_hidden_layers": 120})
    params = random_parameters(cfg, "base")
    write_tf_h5(tmp_path / "tf_model.h5", params, cfg, "base")
    with h5py.File(tmp_path / "tf_model.h5", "r") as f:
        assert "weight_names" not in f["model"].attrs and "weight_names1" in f["model"].attrs
    got = dict(read_tf_h5(tmp_path / "tf_model.h5"))
    assert set(got) == set(params)


def test_write_rejects_bad_tensors(tmp_path):
    cfg = VARIANTS["pre_ln"]
    params = random_parameters(cfg, "base")
    bad = dict(params)
    bad["decoder.layers.0.fc1.weight"] = bad["decoder.layers.0.fc1.weight"].T
    with pytest.raises(CheckpointError, match="fc1.weight has shape"):
        write_tf_h5(tmp_path / "a.h5", bad, cfg, "base")
    missing = dict(params)
    del missing["decoder.layers.1.fc2.bias"]
    with pytest.raises(CheckpointError, match="layers.1.fc2.bias"):
        write_tf_h5(tmp_path / "a.h5", missing, cfg, "base")
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        write_tf_h5(tmp_path / "a.h5", params, cfg.replace(tie_word_embeddings=False), "causal_lm")
    assert not (tmp_path / "a.h5").exists() and not list(tmp_path.iterdir())


def test_unknown_variables_reach_key_accounting(tmp_path):
    cfg = VARIANTS["pre_ln"]
    write_tf_h5(tmp_path / "tf_model.h5", random_parameters(cfg, "base"), cfg, "base")
    with h5py.File(tmp_path / "tf_model.h5", "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["model"].attrs["weight_names"]]
        f["model"].create_dataset("tfopt_model/model/decoder/extra/kernel:0", data=np.zeros((2, 2), np.float32))
        f["model"].attrs.create("weight_names", names + ["tfopt_model/model/decoder/extra/kernel:0"],
                                dtype=h5py.string_dtype("ascii"))
    acc = account_keys(tf_h5_shapes(tmp_path / "tf_model.h5"), cfg, "base")
    with pytest.raises(CheckpointError, match="decoder.extra.weight"):
        acc.raise_for_errors("f")


def test_not_a_keras_file(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("a", data=np.zeros(2))
    with pytest.raises(CheckpointError, match="layer_names"):
        tf_h5_shapes(tmp_path / "x.h5")
    (tmp_path / "y.h5").write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match="cannot read"):
        tf_h5_shapes(tmp_path / "y.h5")


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["post_ln_proj", "no_bias", "no_affine_ln"])
def test_hf_tf_loads_our_file_with_the_same_logits(variant, tmp_path):
    """Our tf_model.h5 alone (no torch weights) in Hugging Face's TFOPTForCausalLM."""
    g = hf_golden(variant)
    cfg = VARIANTS[variant]
    folder = tmp_path / "ours"
    folder.mkdir()
    shutil.copy(g.folder / "config.json", folder)
    st = {canonical_name(k): a for k, a in iter_safetensors(weight_files(g.folder, "safetensors"))}
    st.pop("lm_head.weight", None)
    write_tf_h5(folder / "tf_model.h5", st, cfg, "causal_lm")
    (res,) = oracle_run(folder, [{"framework": "tf", "input_ids": g.ids, "attention_mask": g.mask}])
    assert relative_error(res["logits"], g.tf["logits"], g.mask) < TOLERANCE["float32"]


@pytest.mark.parametrize("variant", ["no_bias", "no_affine_ln"])
def test_identity_extras_are_checked(variant, tmp_path):
    cfg = VARIANTS[variant]
    params = random_parameters(cfg, "base")
    write_tf_h5(tmp_path / "tf_model.h5", params, cfg, "base")
    assert set(tf_h5_shapes(tmp_path / "tf_model.h5")) > set(params)  # what Hugging Face TF needs
    assert set(tf_h5_shapes(tmp_path / "tf_model.h5", cfg)) == set(params)
    assert set(dict(read_tf_h5(tmp_path / "tf_model.h5", config=cfg))) == set(params)
    extra = "decoder.layers.1.fc2.bias" if variant == "no_bias" else "decoder.layers.1.final_layer_norm.weight"
    path = "model/tfopt_model/" + tf_name(extra)
    with h5py.File(tmp_path / "tf_model.h5", "r+") as f:
        f[path][0] = 0.5
    with pytest.raises(CheckpointError, match="must be all"):
        list(read_tf_h5(tmp_path / "tf_model.h5", config=cfg))
