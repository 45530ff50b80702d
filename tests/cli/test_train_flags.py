"""`opt train` flags through the real entry point: each works in every backend its help names, and
one a backend lacks is refused before any work, naming the backends that have it."""

from __future__ import annotations

import json

import pytest

from opt_cli.backends import BACKENDS, adapter
from tests.cli.entry import lines, one_line_error, opt

TINY = ("--tokenizer", "{model}", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--ffn-dim", "64",
        "--context", "32", "--steps", "2", "--batch-size", "2", "--warmup", "1", "--eval-every", "0",
        "--log-every", "1")


def tiny_args(model_dir):
    return [a.format(model=model_dir) for a in TINY]


def test_gradient_checkpointing_in_tf_is_refused_before_any_work(tiny_model_dir, tmp_path):
    proc = opt("train", "--backend", "tf", "--gradient-checkpointing", "--corpus", tiny_model_dir / "text.txt",
               "--out", tmp_path / "out", *tiny_args(tiny_model_dir))
    line = one_line_error(proc, 2, "train")
    assert "--gradient-checkpointing" in line and "torch and flax" in line and "not tf" in line
    assert "data:" not in proc.stdout  # refused before the corpus was prepared
    assert not (tmp_path / "out").exists()


def test_help_names_the_backends_of_each_training_flag():
    out = " ".join(opt("train", "--help").stdout.split())
    assert "recompute layers in backward (torch and flax; tf has none)" in out
    assert "mixed_bfloat16 policy (tf)" in out
    assert [name for name in BACKENDS if adapter(name).checkpoints_gradients] == ["torch", "flax"]


@pytest.mark.parametrize("backend", [pytest.param("flax", marks=pytest.mark.flax),
                                     pytest.param("tf", marks=pytest.mark.tf)])
def test_bf16_trains_in_the_backends_that_fix_the_dtype_at_build(backend, tiny_model_dir, tmp_path):
    """Flax refused --bf16 after preparing the data (its model was built float32); TF built its
    model before the mixed policy was set and trained float32 while saying bf16."""
    out = tmp_path / "out"
    proc = opt("train", "--backend", backend, "--bf16", "--corpus", tiny_model_dir / "text.txt", "--out", out,
               *tiny_args(tiny_model_dir), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert any("step" in ln for ln in lines(proc.stdout))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["arguments"]["bf16"] is True and summary["steps"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32  # a trained model folder, loadable as any other


@pytest.mark.tf
def test_tf_bf16_policy_is_set_before_the_model_is_built():
    import keras

    from opt_core import OPTConfig

    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=16)
    tf_adapter = adapter("tf")
    try:
        model = tf_adapter.new(config, seed=0, **tf_adapter.bf16_training())
        assert model.compute_dtype == "bfloat16" and model.variable_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is process-wide


@pytest.mark.flax
def test_flax_bf16_options_build_a_bf16_model_over_float32_parameters():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from opt_core import OPTConfig

    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=16)
    flax_adapter = adapter("flax")
    model = flax_adapter.new(config, seed=0, **flax_adapter.bf16_training())
    assert jnp.dtype(model.dtype) == jnp.bfloat16
    params = nnx.state(model, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
