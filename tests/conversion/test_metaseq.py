"""metaseq checkpoints: built here by hand in metaseq's exact on-disk layout from known weights
(fused K,V,Q per part, Megatron splits across two model-parallel parts, old 350m names), then
converted and compared with the known weights and the float64 reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conversion import convert
from opt_core import OPTConfig
from opt_core.checkpoint import CheckpointError
from opt_core.params import parameter_table
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from tests.conversion.helpers import assert_same_tensors, read_canonical
from tests.variants import VARIANTS, left_padded_batch

pytestmark = pytest.mark.torch


def metaseq_cfg(config: OPTConfig) -> dict:
    return {"model": {
        "_name": "transformer_lm_megatron",
        "decoder_embed_dim": config.hidden_size,
        "decoder_input_dim": config.embed_dim,
        "decoder_output_dim": config.embed_dim,
        "decoder_layers": config.num_hidden_layers,
        "decoder_attention_heads": config.num_attention_heads,
        "decoder_ffn_embed_dim": config.ffn_dim,
        "decoder_normalize_before": config.do_layer_norm_before,
        "decoder_learned_pos": True,
        "max_target_positions": config.max_position_embeddings,
        "share_decoder_input_output_embed": True,
        "activation_fn": config.activation_function,
        "dropout": 0.1,
        "attention_dropout": 0.0,
    }}


def metaseq_parts(config: OPTConfig, params: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    """metaseq's per-part state dicts, written out by hand (deliberately not with opt_core.layout)."""
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(n)]

    def split(name: str, key: str, axis: int) -> None:
        x = params[name]
        step = x.shape[axis] // n
        for p in range(n):
            sl = [slice(None)] * x.ndim
            sl[axis] = slice(p * step, (p + 1) * step)
            parts[p][key] = x[tuple(sl)].copy()

    def replicate(name: str, key: str) -> None:
        for p in range(n):
            parts[p][key] = params[name].copy()

    split("decoder.embed_tokens.weight", "decoder.embed_tokens.weight", 0)
    split("decoder.embed_tokens.weight", "decoder.output_projection.weight", 0)
    replicate("decoder.embed_positions.weight", "decoder.embed_positions.weight")
    if config.has_projections:  # the old 350m names
        replicate("decoder.project_in.weight", "decoder.project_in_dim.weight")
        replicate("decoder.project_out.weight", "decoder.project_out_dim.weight")
    if config.has_final_layer_norm:
        replicate("decoder.final_layer_norm.weight", "decoder.layer_norm.weight")
        replicate("decoder.final_layer_norm.bias", "decoder.layer_norm.bias")
    d = config.hidden_size // n
    for i in range(config.num_hidden_layers):
        a = f"decoder.layers.{i}.self_attn"
        for leaf in ("weight", "bias"):
            q, k, v = (params[f"{a}.{x}_proj.{leaf}"] for x in "qkv")
            for p in range(n):  # each part: its own heads, fused K, V, Q
                rows = slice(p * d, (p + 1) * d)
                parts[p][f"{a}.qkv_proj.{leaf}"] = np.concatenate([k[rows], v[rows], q[rows]], axis=0)
        split(f"{a}.out_proj.weight", f"{a}.out_proj.weight", 1)
        replicate(f"{a}.out_proj.bias", f"{a}.out_proj.bias")
        L = f"decoder.layers.{i}"
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            for leaf in ("weight", "bias"):
                replicate(f"{L}.{ln}.{leaf}", f"{L}.{ln}.{leaf}")
        split(f"{L}.fc1.weight", f"{L}.fc1.weight", 0)
        split(f"{L}.fc1.bias", f"{L}.fc1.bias", 0)
        split(f"{L}.fc2.weight", f"{L}.fc2.weight", 1)
        replicate(f"{L}.fc2.bias", f"{L}.fc2.bias")
    return parts


def save_metaseq(folder, config, parts, cfg=True, dtype=None, names=None):
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for p, sd in enumerate(parts):
        tensors = {}
        for k, v in sd.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            tensors[k] = t.to(dtype) if dtype is not None else t
        tensors["decoder.version"] = torch.tensor([3.0])
        obj = {"model": tensors}
        if cfg:
            obj["cfg"] = metaseq_cfg(config)
        name = names[p] if names else f"reshard-model_part-{p}.pt"
        torch.save(obj, folder / name)


def _stored(config, params):
    return {s.name: params[s.name] for s in parameter_table(config) if s.tied_to is None}


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_two_parts_convert_to_hf_and_match_the_reference(tmp_path, variant):
    config = VARIANTS[variant]
    params = random_parameters(config, seed=7)
    save_metaseq(tmp_path / "ms", config, metaseq_parts(config, params, 2))
    report = convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", progress=False, verify=True)
    assert report.src_format == "metaseq" and report.verify.ok, report.summary()
    assert any("cfg" in report.config_source for _ in [0])
    assert_same_tensors(read_canonical(tmp_path / "hf"), _stored(config, params))
    derived = OPTConfig.from_pretrained(tmp_path / "hf")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
                  "max_position_embeddings", "do_layer_norm_before", "word_embed_proj_dim", "enable_bias",
                  "remove_final_layer_norm", "layer_norm_elementwise_affine", "activation_function"):
        assert getattr(derived, field) == getattr(config, field), field
    ids, mask = left_padded_batch(config.vocab_size)
    got = ReferenceOPTForCausalLM.from_pretrained(tmp_path / "hf")(ids, attention_mask=mask).logits
    want = ReferenceOPTForCausalLM(config, params)(ids, attention_mask=mask).logits
    np.testing.assert_array_equal(got[mask == 1], want[mask == 1])


def test_single_consolidated_file_and_other_outputs(tmp_path):
    config = VARIANTS["post_ln_proj"]
    params = random_parameters(config, seed=8)
    save_metaseq(tmp_path / "ms", config, metaseq_parts(config, params, 1), names=["consolidated.pt"])
    for to in ("tf-h5", "flax-msgpack", "bin"):
        convert(tmp_path / "ms", tmp_path / to, to=to, progress=False, verify=True)
        assert_same_tensors(read_canonical(tmp_path / to, to), _stored(config, params))
    # a .pt file given directly
    convert(tmp_path / "ms" / "consolidated.pt", tmp_path / "file", to="safetensors", progress=False)
    assert_same_tensors(read_canonical(tmp_path / "file"), _stored(config, params))


def test_bfloat16_parts(tmp_path):
    import torch

    config = VARIANTS["pre_ln"]
    params = random_parameters(config, seed=9)
    save_metaseq(tmp_path / "ms", config, metaseq_parts(config, params, 2), dtype=torch.bfloat16)
    convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", progress=False, verify=True)
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in _stored(config, params).items()}
    assert_same_tensors(read_canonical(tmp_path / "hf"), want)


def _nothing_written(tmp_path, dst):
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(".")]


def test_typo_in_fused_key_is_reported_by_name(tmp_path):
    """Hugging Face's converter once looked for `.qkj_proj.` and silently skipped the split."""
    config = VARIANTS["pre_ln"]
    parts = metaseq_parts(config, random_parameters(config), 2)
    for sd in parts:
        sd["decoder.layers.0.self_attn.qkj_proj.weight"] = sd.pop("decoder.layers.0.self_attn.qkv_proj.weight")
    save_metaseq(tmp_path / "ms", config, parts)
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", progress=False)
    msg = str(e.value)
    assert "decoder.layers.0.self_attn.qkj_proj.weight" in msg
    for x in "qkv":
        assert f"decoder.layers.0.self_attn.{x}_proj.weight" in msg
    _nothing_written(tmp_path, tmp_path / "hf")


def test_extra_key_is_reported_by_name(tmp_path):
    config = VARIANTS["pre_ln"]
    parts = metaseq_parts(config, random_parameters(config), 2)
    for sd in parts:
        sd["decoder.layers.1.self_attn.rotary.inv_freq"] = np.ones(4, np.float32)
    save_metaseq(tmp_path / "ms", config, parts)
    pattern = r"unknown tensors \(1\): decoder\.layers\.1\.self_attn\.rotary\.inv_freq"
    with pytest.raises(CheckpointError, match=pattern):
        convert(tmp_path / "ms", tmp_path / "hf", to="tf-h5", progress=False)
    _nothing_written(tmp_path, tmp_path / "hf")


def test_without_cfg_the_config_must_be_given(tmp_path):
    config = VARIANTS["post_ln_proj"]
    params = random_parameters(config, seed=2)
    save_metaseq(tmp_path / "ms", config, metaseq_parts(config, params, 2), cfg=False)
    with pytest.raises(ValueError, match="--config"):
        convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", progress=False)
    _nothing_written(tmp_path, tmp_path / "hf")
    config.save_pretrained(tmp_path / "cfg")
    report = convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", config=tmp_path / "cfg", progress=False)
    assert report.config_source.endswith("config.json")
    assert_same_tensors(read_canonical(tmp_path / "hf"), _stored(config, params))


def test_replicated_tensors_that_differ_between_parts_stop_the_conversion(tmp_path):
    config = VARIANTS["pre_ln"]
    parts = metaseq_parts(config, random_parameters(config), 2)
    parts[1]["decoder.layers.1.fc2.bias"] = parts[1]["decoder.layers.1.fc2.bias"] + 1
    save_metaseq(tmp_path / "ms", config, parts)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.fc2\.bias.*replicated"):
        convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", progress=False)
    _nothing_written(tmp_path, tmp_path / "hf")


def test_cfg_disagreeing_with_tensors(tmp_path):
    import torch

    config = VARIANTS["pre_ln"]
    save_metaseq(tmp_path / "ms", config, metaseq_parts(config, random_parameters(config), 1))
    obj = torch.load(tmp_path / "ms" / "reshard-model_part-0.pt", weights_only=True)
    obj["cfg"]["model"]["decoder_layers"] = 5
    torch.save(obj, tmp_path / "ms" / "reshard-model_part-0.pt")
    with pytest.raises(CheckpointError, match="decoder_layers=5 but the tensors say 2"):
        convert(tmp_path / "ms", tmp_path / "hf", to="safetensors", progress=False)
    _nothing_written(tmp_path, tmp_path / "hf")
