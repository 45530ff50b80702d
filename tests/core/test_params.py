"""The canonical parameter table against the names and shapes Hugging Face actually writes."""

from __future__ import annotations

import pytest

from opt_core import Head, OPTConfig, parameter_table
from opt_core.checkpoint import account_keys, safetensors_shapes, weight_files
from opt_core.params import Role, canonical_name, hf_name
from tests.golden import golden_checkpoint
from tests.variants import CORE_VARIANTS, VARIANTS


@pytest.mark.oracle
@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_table_equals_hf_state_dict(variant):
    """Same names, same order, same shapes as HF's OPTForCausalLM (HF drops the tied lm_head from
    safetensors, so the table's tied entry is the only difference)."""
    folder = golden_checkpoint(variant)
    shapes = safetensors_shapes(weight_files(folder, "safetensors"))
    table = parameter_table(VARIANTS[variant], Head.CAUSAL_LM)
    expected = {hf_name(s.name, Head.CAUSAL_LM): s.shape for s in table if s.tied_to is None}
    assert shapes == expected
    acc = account_keys(shapes, VARIANTS[variant], Head.CAUSAL_LM)
    assert acc.ok and acc.tied == ["lm_head.weight"]


def test_variant_switches_change_the_table():
    base = {s.name for s in parameter_table(VARIANTS["pre_ln"])}
    no_bias = {s.name for s in parameter_table(VARIANTS["no_bias"])}
    assert {n for n in base - no_bias} == {n for n in base if n.endswith(".bias") and "layer_norm" not in n}
    no_affine = {s.name for s in parameter_table(VARIANTS["no_affine_ln"])}
    assert all("layer_norm" in n for n in base - no_affine) and not any("layer_norm" in n for n in no_affine)
    proj = {s.name for s in parameter_table(VARIANTS["post_ln_proj"])}
    assert {"decoder.project_in.weight", "decoder.project_out.weight"} <= proj
    assert "decoder.final_layer_norm.weight" not in proj  # post-LN has no final LayerNorm
    assert "decoder.final_layer_norm.weight" not in {s.name for s in parameter_table(VARIANTS["no_final_ln"])}


def test_heads():
    cfg = OPTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, ffn_dim=8, vocab_size=50,
                    word_embed_proj_dim=16, num_labels=3)
    names = lambda head: [s.name for s in parameter_table(cfg, head)]  # noqa: E731
    assert names(Head.SEQUENCE_CLASSIFICATION)[-1] == "score.weight"
    assert names(Head.QUESTION_ANSWERING)[-2:] == ["qa_outputs.weight", "qa_outputs.bias"]
    by = {s.name: s for s in parameter_table(cfg, Head.SEQUENCE_CLASSIFICATION)}
    assert by["score.weight"].shape == (3, 16)  # sized by word_embed_proj_dim, not hidden_size
    lm = {s.name: s for s in parameter_table(cfg, Head.CAUSAL_LM)}["lm_head.weight"]
    assert lm.shape == (50, 16) and lm.tied_to == "decoder.embed_tokens.weight"
    assert "lm_head.weight" not in names(Head.BASE)


def test_framework_layouts():
    for spec in parameter_table(VARIANTS["pre_ln"]):
        expected = "transpose" if spec.role is Role.LINEAR_WEIGHT else "identity"
        assert spec.layout("tf").value == expected and spec.layout("flax").value == expected
        assert spec.layout("torch").value == "identity"
    with pytest.raises(ValueError, match="unknown framework"):
        parameter_table(VARIANTS["pre_ln"])[0].layout("mxnet")


def test_prefix_variants():
    assert canonical_name("model.decoder.layers.0.fc1.weight") == "decoder.layers.0.fc1.weight"
    assert canonical_name("decoder.layers.0.fc1.weight") == "decoder.layers.0.fc1.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"
    assert hf_name("decoder.x", Head.BASE) == "decoder.x" and hf_name("decoder.x", "causal_lm") == "model.decoder.x"


def test_accounting_lists_every_problem():
    cfg = VARIANTS["pre_ln"]
    shapes = {hf_name(s.name, "causal_lm"): s.shape for s in parameter_table(cfg)}
    del shapes["model.decoder.layers.1.fc2.bias"]
    shapes["model.decoder.layers.0.self_attn.qkj_proj.weight"] = (32, 32)
    shapes["model.decoder.layers.0.fc1.weight"] = (64, 31)
    shapes["decoder.layers.0.fc2.weight"] = (32, 64)  # both prefix variants of one key
    acc = account_keys(shapes, cfg, "causal_lm")
    with pytest.raises(ValueError) as e:
        acc.raise_for_errors("ckpt/")
    msg = str(e.value)
    assert "decoder.layers.1.fc2.bias" in msg and "qkj_proj" in msg
    assert "model.decoder.layers.0.fc1.weight is [64, 31], the config implies [64, 32]" in msg
    assert "the same parameter twice" in msg


def test_accounting_new_head_and_ignored_head():
    cfg = VARIANTS["pre_ln"]
    lm = {hf_name(s.name, "causal_lm"): s.shape for s in parameter_table(cfg)}
    acc = account_keys(lm, cfg, "sequence_classification")
    assert acc.ok and acc.new_head == ["score.weight"] and acc.ignored == ["lm_head.weight"]
    acc = account_keys(lm, cfg, "base")
    assert acc.ok and acc.ignored == ["lm_head.weight"]
