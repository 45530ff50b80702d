"""opt_core.lora: the config and its checks, the scaling rule, PEFT's key names and files, and the
seeded initialisation (framework-free; the backends and PEFT itself are in test_lora_backends.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from opt_core.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LORA_SALT,
    LoraConfig,
    init_adapter,
    init_lora_a,
    linear_shapes,
    load_adapter_files,
    lora_a_uniforms,
    parse_peft_key,
    peft_key,
    save_adapter_files,
)

SHAPES = linear_shapes(8, 16)


def _fmix32(x: int) -> int:
    """MurmurHash3's finaliser on a Python int (an independent spelling of opt_core.sampling.fmix32)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert LoraConfig(r=8, lora_alpha=16).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=16, use_rslora=True).scaling == 4.0


def test_defaults_are_pefts_for_opt():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.target_modules, c.use_rslora, c.bias) == \
        (8, 8, 0.0, ("q_proj", "v_proj"), False, "none")


@pytest.mark.parametrize("kwargs, needle", [
    ({"r": 0}, "LoraConfig.r"),
    ({"r": 2.5}, "LoraConfig.r"),
    ({"lora_alpha": -1}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"target_modules": "all-linear"}, "target_modules"),
    ({"target_modules": ["q_proj", "gate_proj"]}, "'gate_proj'"),
    ({"target_modules": []}, "empty"),
    ({"target_modules": ["q_proj", "q_proj"]}, "repeats"),
    ({"bias": "all"}, "bias"),
])
def test_bad_config_values_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LoraConfig(**kwargs)


def test_config_round_trips_through_adapter_config_json(tmp_path):
    config = LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=("q_proj", "fc2"), use_rslora=True,
                        base_model_name_or_path="facebook/opt-125m", extra={"revision": None, "custom": 3})
    config.save_pretrained(tmp_path)
    d = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q_proj", "fc2"] and d["custom"] == 3
    again = LoraConfig.from_pretrained(tmp_path)
    assert again == config and again.extra["custom"] == 3


@pytest.mark.parametrize("key, value, needle", [
    ("use_dora", True, "use_dora"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("layers_to_transform", [0], "layers_to_transform"),
    ("modules_to_save", ["score"], "modules_to_save"),
    ("rank_pattern", {"q_proj": 2}, "rank_pattern"),
    ("peft_type", "PREFIX_TUNING", "peft_type"),
    ("target_modules", ".*proj", "target_modules"),
    ("r", -3, "LoraConfig.r"),
])
def test_unsupported_adapter_config_settings_are_refused_by_name(tmp_path, key, value, needle):
    d = LoraConfig().to_dict() | {key: value}
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ValueError, match=needle) as err:
        LoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_a_config_that_is_not_json_is_named_without_quoting_it(tmp_path):
    (tmp_path / ADAPTER_CONFIG_NAME).write_bytes(b"\x00secret-bytes{")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        LoraConfig.from_pretrained(tmp_path)
    assert "secret" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG_NAME):
        LoraConfig.from_pretrained(tmp_path / "missing")


def test_peft_key_names_parse_back():
    for module in SHAPES:
        for matrix in "AB":
            key = peft_key(3, module, matrix)
            assert key.startswith("base_model.model.model.decoder.layers.3.")
            assert key.endswith(f".{module}.lora_{matrix}.weight")
            assert parse_peft_key(key) == (3, module, matrix)
    assert peft_key(0, "q_proj", "A") == "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match="unexpected adapter key"):
        parse_peft_key("base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight")


def test_a_is_the_documented_counter_stream():
    """Re-derive a few entries of A with plain Python ints from the module docstring's formula."""
    seed, layer, module, r, n_in = (7 << 32) + 5, 1, "fc1", 3, 8
    a = init_lora_a(seed, layer, module, r, n_in)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    s = _fmix32(_fmix32(_fmix32(_fmix32(k0 ^ LORA_SALT) ^ k1) ^ layer) ^ 4)  # fc1 is module index 4
    for i in (0, 5, 23):
        bits = _fmix32(s ^ _fmix32((i + 0x9E3779B9) & 0xFFFFFFFF))
        u = ((bits >> 8) + 0.5) / 2**24
        assert a.reshape(-1)[i] == np.float32((2 * np.float32(u) - 1) * np.float32(1 / math.sqrt(n_in)))


def test_a_is_uniform_on_pefts_kaiming_bound_and_depends_on_everything():
    a = init_lora_a(0, 0, "q_proj", 64, 256)
    bound = 1 / math.sqrt(256)
    assert a.dtype == np.float32 and a.shape == (64, 256)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    u = lora_a_uniforms(0, 0, "q_proj", 64, 256).reshape(-1)
    counts = np.histogram(u, bins=8, range=(0, 1))[0]
    assert np.all(np.abs(counts - u.size / 8) < 5 * math.sqrt(u.size / 8))  # 16384 draws, 8 bins
    others = [init_lora_a(1, 0, "q_proj", 64, 256), init_lora_a(0, 1, "q_proj", 64, 256),
              init_lora_a(0, 0, "v_proj", 64, 256)]
    for other in others:
        assert np.corrcoef(a.reshape(-1), other.reshape(-1))[0, 1] < 0.05
    np.testing.assert_array_equal(a, init_lora_a(0, 0, "q_proj", 64, 256))


def test_adapter_files_round_trip_with_peft_names(tmp_path):
    config = LoraConfig(r=2, target_modules=("q_proj", "fc1"))
    weights = init_adapter(config, 2, SHAPES, seed=3)
    weights = {k: (a, np.full_like(b, 0.5)) for k, (a, b) in weights.items()}
    paths = save_adapter_files(tmp_path, config, weights)
    assert sorted(p.name for p in paths) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    again_config, again = load_adapter_files(tmp_path, 2, SHAPES)
    assert again_config == config and again.keys() == weights.keys()
    for k in weights:
        np.testing.assert_array_equal(again[k][0], weights[k][0])
        np.testing.assert_array_equal(again[k][1], weights[k][1])


def _write(tmp_path, config, tensors):
    from safetensors.numpy import save_file

    config.save_pretrained(tmp_path)
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS_NAME))


def _good(config, layers=2):
    out = {}
    for (layer, module), (a, b) in init_adapter(config, layers, SHAPES).items():
        out[peft_key(layer, module, "A")], out[peft_key(layer, module, "B")] = a, b
    return out


@pytest.mark.parametrize("break_it, needle", [
    (lambda t: t.pop(peft_key(1, "q_proj", "B")), "missing .*layers.1.self_attn.q_proj.lora_B"),
    (lambda t: t.update({peft_key(0, "q_proj", "A"): np.zeros((3, 8), np.float32)}), r"shape \[3, 8\].*r=2"),
    (lambda t: t.update({peft_key(0, "fc1", "B"): np.zeros((8, 2), np.float32)}), r"expected \[16, 2\]"),
    (lambda t: t.update({peft_key(0, "k_proj", "A"): np.zeros((2, 8), np.float32)}), "not in target_modules"),
    (lambda t: t.update({peft_key(5, "q_proj", "A"): np.zeros((2, 8), np.float32)}), "layer 5.*2 layers"),
    (lambda t: t.update({"base_model.model.lm_head.weight": np.zeros((2, 8), np.float32)}), "unexpected adapter key"),
    (lambda t: t.update({peft_key(0, "q_proj", "A"): np.zeros((2, 8), np.int32)}), "dtype int32"),
])
def test_bad_adapter_files_are_named(tmp_path, break_it, needle):
    config = LoraConfig(r=2, target_modules=("q_proj", "fc1"))
    tensors = _good(config)
    break_it(tensors)
    _write(tmp_path, config, tensors)
    with pytest.raises(ValueError, match=needle) as err:
        load_adapter_files(tmp_path, 2, SHAPES)
    assert ADAPTER_WEIGHTS_NAME in str(err.value)


def test_missing_or_unreadable_weights_are_named(tmp_path):
    LoraConfig().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS_NAME):
        load_adapter_files(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(b"\xffnot-safetensors-secret")
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        load_adapter_files(tmp_path)
    assert "secret" not in str(err.value)
