"""opt_core.formats.flax_msgpack against files Hugging Face's Flax writer produced."""

from __future__ import annotations

import numpy as np
import pytest

import opt_core.formats.flax_msgpack as fm
from opt_core.checkpoint import CheckpointError, account_keys, load_numpy_state_dict
from tests.golden import golden_checkpoint
from tests.variants import VARIANTS

pytestmark = pytest.mark.flax


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_bias", "no_affine_ln"])
def test_hf_msgpack_reads_as_safetensors(variant):
    folder, config = golden_checkpoint(variant), VARIANTS[variant]
    shapes = fm.flax_msgpack_shapes(folder / fm.FLAX_MSGPACK, config)
    acc = account_keys(shapes, config, "causal_lm")
    acc.raise_for_errors(str(folder))
    assert acc.tied == ["lm_head.weight"]
    state, _ = load_numpy_state_dict(folder, config, "causal_lm")
    got = dict(fm.read_flax_msgpack(folder / fm.FLAX_MSGPACK, config=config))
    assert set(got) == set(state) - {"lm_head.weight"}
    for name, arr in got.items():
        assert arr.dtype == state[name].dtype and np.array_equal(arr, state[name]), name


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_writer_reproduces_hf_file_byte_for_byte(variant, tmp_path):
    folder, config = golden_checkpoint(variant), VARIANTS[variant]
    state, _ = load_numpy_state_dict(folder, config, "causal_lm")
    out = fm.write_flax_msgpack(tmp_path / fm.FLAX_MSGPACK, state, config, "causal_lm")
    assert out.read_bytes() == (folder / fm.FLAX_MSGPACK).read_bytes()


def test_writer_adds_the_identity_tensors_hf_flax_expects(tmp_path):
    # HF Flax always has LayerNorm scale/bias: the no-affine file must hold the same tree as HF's
    # (HF appends its added keys out of order, so compare trees, not bytes).
    import flax.serialization
    import jax

    folder, config = golden_checkpoint("no_affine_ln"), VARIANTS["no_affine_ln"]
    state, _ = load_numpy_state_dict(folder, config, "causal_lm")
    out = fm.write_flax_msgpack(tmp_path / fm.FLAX_MSGPACK, state, config, "causal_lm")
    ours = flax.serialization.msgpack_restore(out.read_bytes())
    theirs = flax.serialization.msgpack_restore((folder / fm.FLAX_MSGPACK).read_bytes())
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_identity_extras_must_be_identity(tmp_path):
    config = VARIANTS["no_bias"]
    state, _ = load_numpy_state_dict(golden_checkpoint("no_bias"), config, "causal_lm")
    path = fm.write_flax_msgpack(tmp_path / fm.FLAX_MSGPACK, state, config)
    # Rewrite the file as if from a biased model: a non-zero bias must be refused, not dropped.
    biased = config.replace(enable_bias=True)
    full = dict(state)
    full["decoder.layers.0.fc1.bias"] = np.ones(config.ffn_dim, np.float32)
    for spec_name, (shape, value) in fm.identity_extras(config).items():
        full.setdefault(spec_name, np.full(shape, value, np.float32))
    fm.write_flax_msgpack(path, full, biased)
    with pytest.raises(CheckpointError, match="fc1/bias"):
        list(fm.read_flax_msgpack(path, config=config))


def test_chunked_leaves_and_bfloat16_round_trip(tmp_path, monkeypatch):
    import flax.serialization
    import ml_dtypes

    config = VARIANTS["pre_ln"]
    state, _ = load_numpy_state_dict(golden_checkpoint("pre_ln"), config, "causal_lm")
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items() if k != "lm_head.weight"}
    monkeypatch.setattr(fm, "MAX_CHUNK_BYTES", 256)  # force Flax's chunked form
    path = fm.write_flax_msgpack(tmp_path / "x.msgpack", state, config)
    tree = flax.serialization.msgpack_restore(path.read_bytes())  # Flax itself reads it back
    np.testing.assert_array_equal(tree["model"]["decoder"]["embed_tokens"]["embedding"],
                                  state["decoder.embed_tokens.weight"])
    got = dict(fm.read_flax_msgpack(path))
    for name, arr in state.items():
        assert arr.dtype == got[name].dtype and np.array_equal(arr, got[name]), name


def test_writer_is_strict(tmp_path):
    config = VARIANTS["pre_ln"]
    state, _ = load_numpy_state_dict(golden_checkpoint("pre_ln"), config, "causal_lm")
    missing = {k: v for k, v in state.items() if k != "decoder.layers.1.fc2.weight"}
    with pytest.raises(CheckpointError, match="decoder.layers.1.fc2.weight"):
        fm.write_flax_msgpack(tmp_path / "a.msgpack", missing, config)
    bad = dict(state, **{"decoder.layers.0.fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="fc1.weight"):
        fm.write_flax_msgpack(tmp_path / "b.msgpack", bad, config)
    assert not (tmp_path / "b.msgpack").exists()


def test_truncated_file_is_an_error(tmp_path):
    data = (golden_checkpoint("pre_ln") / fm.FLAX_MSGPACK).read_bytes()
    (tmp_path / "t.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        fm.flax_msgpack_shapes(tmp_path / "t.msgpack")
