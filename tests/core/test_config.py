"""OPTConfig: real config.json round trips, presets, validation errors."""

from __future__ import annotations

import json

import pytest

from opt_core import PRESETS, OPTConfig
from opt_core.params import parameter_count
from tests.conftest import CONFIGS_DIR

REAL = ["opt-125m.config.json", "opt-350m.config.json"]


@pytest.mark.parametrize("name", REAL)
def test_real_config_round_trip_keeps_every_key(name, tmp_path):
    original = json.loads((CONFIGS_DIR / name).read_text())
    cfg = OPTConfig.from_pretrained(CONFIGS_DIR / name)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        assert saved[key] == value, key
    assert OPTConfig.from_pretrained(tmp_path) == cfg
    assert OPTConfig.from_pretrained(tmp_path).to_dict() == saved


def test_real_350m_reads_its_quirks():
    cfg = OPTConfig.from_pretrained(CONFIGS_DIR / "opt-350m.config.json")
    assert not cfg.do_layer_norm_before and cfg.embed_dim == 512 and cfg.hidden_size == 1024
    assert cfg.has_projections and not cfg.has_final_layer_norm
    assert cfg.extra["architectures"] == ["OPTForCausalLM"]


def test_unknown_keys_survive(tmp_path):
    cfg = OPTConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "my_field": {"a": [1, 2]}})
    cfg.save_pretrained(tmp_path)
    assert OPTConfig.from_pretrained(tmp_path / "config.json").extra["my_field"] == {"a": [1, 2]}


def test_remove_final_layer_norm_uses_hf_json_name():
    d = OPTConfig(remove_final_layer_norm=True).to_dict()
    assert d["_remove_final_layer_norm"] is True and "remove_final_layer_norm" not in d
    assert OPTConfig.from_dict(d).remove_final_layer_norm


def test_num_labels_from_id2label(tmp_path):
    cfg = OPTConfig(num_labels=5)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert len(data["id2label"]) == 5
    assert OPTConfig.from_pretrained(tmp_path).num_labels == 5


def test_presets_match_real_configs():
    for name in ("opt-125m", "opt-350m"):
        real = OPTConfig.from_pretrained(CONFIGS_DIR / f"{name}.config.json")
        preset = OPTConfig.from_preset(name)
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                      "do_layer_norm_before", "word_embed_proj_dim", "vocab_size", "max_position_embeddings"):
            assert getattr(preset, field) == getattr(real, field), (name, field)


@pytest.mark.parametrize(
    "name, billions",
    [("opt-125m", 0.125), ("opt-350m", 0.35), ("opt-1.3b", 1.3), ("opt-2.7b", 2.7), ("opt-6.7b", 6.7),
     ("opt-13b", 13), ("opt-30b", 30), ("opt-66b", 66), ("opt-175b", 175)],
)
def test_preset_parameter_counts(name, billions):
    # The expected sizes are the released models' names, which are rounded: opt-350m really has
    # 331M parameters (5.4% under its name), the others are within 2%. This checks that the preset
    # table and the parameter table together describe the released models.
    count = parameter_count(OPTConfig.from_preset(name)) / 1e9
    assert abs(count - billions) / billions < 0.06, count


def test_preset_names_are_exact():
    assert len(PRESETS) == 9
    assert OPTConfig.from_preset("facebook/opt-1.3b") == OPTConfig.from_preset("1.3b")
    with pytest.raises(ValueError, match="unknown OPT preset"):
        OPTConfig.from_preset("opt-1.3")  # no substring matching


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, num_attention_heads=12), "not divisible"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be positive"),
        (dict(vocab_size=-5), "vocab_size must be positive"),
        (dict(activation_function="mish"), "activation_function 'mish' is unknown"),
        (dict(pad_token_id=50272), "pad_token_id = 50272 is outside the vocabulary"),
        (dict(dropout=1.5), "dropout must be a probability"),
        (dict(hidden_size="768"), "hidden_size must be an integer"),
        (dict(problem_type="ranking"), "problem_type 'ranking' is unknown"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OPTConfig(**kwargs)


def test_config_file_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        OPTConfig.from_pretrained(tmp_path)


def test_config_file_missing_required_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "model_type": "opt"}))
    with pytest.raises(ValueError, match="missing required OPT config fields: num_hidden_layers"):
        OPTConfig.from_pretrained(tmp_path)


def test_config_wrong_model_type():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        OPTConfig.from_dict({"model_type": "gpt2"})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no OPT config"):
        OPTConfig.from_pretrained(tmp_path)
