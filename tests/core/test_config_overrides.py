"""`from_pretrained(path, **config_overrides)`'s config side (`opt_core.config_overrides`) and the
frozen config's hint: Hugging Face's label bookkeeping (num_labels <-> id2label), values checked as
config.json values are, unknown keywords named."""

from __future__ import annotations

import dataclasses

import pytest

from opt_core import OPTConfig
from opt_core.config_overrides import apply_config_overrides, override_names


@pytest.fixture
def config() -> OPTConfig:
    return OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)


def test_fields_change_and_nothing_else(config):
    new = apply_config_overrides(config, {"dropout": 0.0, "attention_dropout": 0.25, "pad_token_id": 0,
                                          "_remove_final_layer_norm": True})
    assert (new.dropout, new.attention_dropout, new.pad_token_id, new.remove_final_layer_norm) == (0.0, 0.25, 0, True)
    assert new.replace(dropout=config.dropout, attention_dropout=0.0, pad_token_id=1,
                       remove_final_layer_norm=False) == config
    assert apply_config_overrides(config, {}) is config


def test_num_labels_writes_hugging_faces_label_maps(config):
    new = apply_config_overrides(config, {"num_labels": 3})
    assert new.num_labels == 3
    assert new.extra["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert new.extra["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert OPTConfig.from_dict(new.to_dict()) == new  # survives config.json
    named = config.replace(extra={"id2label": {"0": "neg", "1": "pos", "2": "neu"}}, num_labels=3)
    assert apply_config_overrides(named, {"num_labels": 3}).extra["id2label"]["2"] == "neu"  # same size: kept


def test_id2label_sets_num_labels_and_label2id(config):
    new = apply_config_overrides(config, {"id2label": {0: "neg", 1: "neu", 2: "pos"}})
    assert new.num_labels == 3
    assert new.extra["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}  # config.json's string keys
    assert new.extra["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    both = apply_config_overrides(config, {"num_labels": 2, "id2label": {"0": "no", "1": "yes"},
                                           "label2id": {"no": 0, "yes": 1}})
    assert both.num_labels == 2 and both.extra["label2id"] == {"no": 0, "yes": 1}
    assert OPTConfig.from_dict(new.to_dict()).num_labels == 3


@pytest.mark.parametrize("overrides, message", [
    ({"num_labels": 2, "id2label": {0: "a", 1: "b", 2: "c"}}, r"num_labels=2 and id2label \(with 3 labels\) disagree"),
    ({"id2label": {0: "a", 2: "c"}}, r"id2label ids must be 0..1, got \[0, 2\]"),
    ({"id2label": {"x": "a"}}, "id2label key 'x' is not a label id"),
    ({"id2label": []}, "id2label must be a non-empty dict"),
    ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}}, "not the inverse of id2label"),
    ({"label2id": {"a": 0, "b": 5}}, r"label2id ids must be in \[0, 2\)"),
    ({"label2id": ["a"]}, "label2id must be a dict"),
    ({"num_labels": 0}, "OPTConfig.num_labels must be positive, got 0"),
    ({"num_labels": "3"}, "OPTConfig.num_labels must be an integer, got '3'"),
    ({"dropout": 1.5}, r"OPTConfig.dropout must be a probability in \[0, 1\], got 1.5"),
    ({"activation_function": "swish2"}, "activation_function 'swish2' is unknown"),
    ({"pad_token_id": 64}, r"pad_token_id = 64 is outside the vocabulary \[0, 64\)"),
])
def test_values_are_checked_like_config_json(config, overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_config_overrides(config, overrides)


def test_an_unknown_keyword_is_one_type_error_naming_it(config):
    with pytest.raises(TypeError) as e:
        apply_config_overrides(config, {"num_lables": 3, "dropout": 0.0, "device_map": "auto"},
                               options=["dtype", "revision"])
    text = str(e.value)
    assert "'num_lables', 'device_map'" in text and "(dtype, revision)" in text and "num_labels" in text
    with pytest.raises(TypeError, match="torch_dtype=.*older spelling of dtype="):
        apply_config_overrides(config, {"torch_dtype": "float16"})
    with pytest.raises(TypeError, match="'extra'"):
        apply_config_overrides(config, {"extra": {}})
    assert "torch_dtype" not in override_names() and {"num_labels", "id2label", "dropout"} <= set(override_names())


def test_assigning_to_the_frozen_config_says_how_to_change_it(config):
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"config.replace\(num_labels=...\).*from_pretrained"):
        config.num_labels = 3
    with pytest.raises(AttributeError, match=r"no field 'labels'.*extra"):  # FrozenInstanceError is one
        config.labels = 3
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'dropout'"):
        del config.dropout
    assert config.replace(num_labels=3).num_labels == 3 and config.num_labels == 2
