"""The device-map planner (Accelerate's big-model semantics), framework-free."""

from __future__ import annotations

import pytest

from opt_core import Head, OPTConfig, parameter_table
from opt_core.placement import (
    PlacementError,
    parse_max_memory,
    placement_units,
    plan_auto,
    plan_from_dict,
    plan_placement,
)
from tests.variants import TINY, VARIANTS

CONFIG = OPTConfig(**{**TINY, "num_hidden_layers": 6})


def _sizes(config, head, itemsize):
    """Bytes of the embedding unit, of one layer and of everything else, straight from the table."""
    table = parameter_table(config, head)
    layer = sum(s.numel for s in table if s.layer == 0) * itemsize
    embed = sum(s.numel for s in table if s.name == "decoder.embed_tokens.weight") * itemsize
    resident = sum(s.numel for s in table if s.layer is None and s.tied_to is None) * itemsize
    return embed, layer, resident


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_bias"])
def test_units_cover_every_parameter_once(variant):
    config = VARIANTS[variant]
    units = placement_units(config, Head.CAUSAL_LM, 2)
    table = parameter_table(config, Head.CAUSAL_LM)
    stored = [s.name for s in table if s.tied_to is None]
    assert sorted(p for u in units for p in u.params) == sorted(stored)
    assert sum(u.nbytes for u in units) == 2 * sum(s.numel for s in table if s.tied_to is None)
    layers = [f"decoder.layers.{i}" for i in range(config.num_hidden_layers)]
    assert [u.name for u in units if u.layer is not None] == layers
    names = [u.name for u in units]
    assert names[0] == "decoder.embed_tokens"
    # The tied head is the embedding's tensor: listed with it, not a unit of its own.
    embed = units[0]
    assert embed.aliases == ("lm_head",) and "lm_head" not in names


def test_untied_head_is_its_own_unit():
    config = CONFIG.replace(tie_word_embeddings=False)
    units = placement_units(config, Head.CAUSAL_LM, 4)
    assert units[-1].name == "lm_head" and units[-1].nbytes == config.vocab_size * config.embed_dim * 4
    assert units[0].aliases == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1GB", 10**9), ("500MiB", 500 * 2**20), ("2.5GiB", int(2.5 * 2**30)), ("10KB", 10_000), (12345, 12345)],
)
def test_sizes_parse_as_accelerate(text, expected):
    assert parse_max_memory({"cpu": text}) == {"cpu": expected}


def test_budget_order_and_device_spellings():
    parsed = parse_max_memory({"cpu": 10, "cuda:1": 20, 0: 30})
    assert list(parsed) == [0, 1, "cpu"] and parsed == {0: 30, 1: 20, "cpu": 10}


@pytest.mark.parametrize(
    ("max_memory", "message"),
    [
        ({"gpu": "1GB"}, "unknown device 'gpu'"),
        ({"cpu": "lots"}, r"max_memory\['cpu'\] = 'lots' is not a size"),
        ({"cpu": -5}, "is not a size"),
        ({"disk": "1GB"}, "disk space is not budgeted"),
        ({"cuda": 1, 0: 2}, "twice"),
    ],
)
def test_bad_max_memory_one_line(max_memory, message):
    with pytest.raises(PlacementError, match=message) as e:
        parse_max_memory(max_memory)
    assert "\n" not in str(e.value)


def test_auto_everything_fits_on_cpu():
    units = placement_units(CONFIG, Head.CAUSAL_LM, 4)
    plan = plan_auto(units, {"cpu": sum(u.nbytes for u in units)})
    assert set(plan.devices.values()) == {"cpu"} and plan.offloaded == [] and plan.main_device == "cpu"


def test_auto_overflows_layers_to_disk_keeping_room_for_one():
    embed, layer, resident = _sizes(CONFIG, Head.CAUSAL_LM, 4)
    fit = 2  # layers kept in memory
    # Room for the resident modules, `fit` layers and one layer streamed in from disk, minus a byte.
    budget = resident + (fit + 1) * layer + layer - 1
    plan = plan_auto(placement_units(CONFIG, Head.CAUSAL_LM, 4), {"cpu": budget})
    layers = [plan.devices[f"decoder.layers.{i}"] for i in range(6)]
    assert layers == ["cpu"] * fit + ["disk"] * (6 - fit)
    assert [u.name for u in plan.offloaded] == [f"decoder.layers.{i}" for i in range(fit, 6)]
    assert all(plan.devices[n] == "cpu" for n in ("decoder.embed_tokens", "decoder.final_layer_norm"))
    # Without the streamed layer's reserve one more layer would have fitted: the reserve is real.
    assert (budget - resident) // layer == fit + 1


def test_auto_fills_gpus_in_order_then_cpu_then_disk():
    _, layer, resident = _sizes(CONFIG, Head.CAUSAL_LM, 2)
    budgets = parse_max_memory({1: 2 * layer, 0: resident + layer + layer, "cpu": layer})
    plan = plan_auto(placement_units(CONFIG, Head.CAUSAL_LM, 2), budgets)
    # GPU 0: resident modules, one layer, and the reserve for disk layers; GPU 1: two; CPU: one.
    assert [plan.devices[f"decoder.layers.{i}"] for i in range(6)] == [0, 1, 1, "cpu", "disk", "disk"]
    assert plan.main_device == 0 and plan.devices["decoder.embed_tokens"] == 0
    hf = plan.hf_device_map(Head.CAUSAL_LM)
    assert hf["model.decoder.layers.4"] == "disk" and hf["lm_head"] == 0 and hf["model.decoder.embed_tokens"] == 0


def test_auto_refuses_a_budget_below_the_embeddings():
    embed, layer, resident = _sizes(CONFIG, Head.CAUSAL_LM, 4)
    with pytest.raises(PlacementError, match=r"cannot hold decoder.embed_tokens .*raise max_memory") as e:
        plan_auto(placement_units(CONFIG, Head.CAUSAL_LM, 4), {"cpu": embed - 1})
    assert "\n" not in str(e.value)


def test_hf_device_map_keys_follow_the_head():
    units = placement_units(CONFIG, Head.BASE, 4)
    plan = plan_auto(units, {"cpu": 10**9})
    assert list(plan.hf_device_map(Head.BASE))[:2] == ["decoder.embed_tokens", "decoder.embed_positions"]
    causal = plan_auto(placement_units(CONFIG, Head.CAUSAL_LM, 4), {"cpu": 10**9}).hf_device_map(Head.CAUSAL_LM)
    assert "model.decoder.layers.5" in causal and "lm_head" in causal


def test_explicit_map_longest_key_wins():
    units = placement_units(CONFIG, Head.CAUSAL_LM, 4)
    plan = plan_from_dict(units, {"": "cpu", "model.decoder.layers": "disk", "model.decoder.layers.0": "cpu"},
                          Head.CAUSAL_LM)
    assert [plan.devices[f"decoder.layers.{i}"] for i in range(6)] == ["cpu"] + ["disk"] * 5
    assert plan.devices["decoder.final_layer_norm"] == "cpu" and plan.main_device == "cpu"


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"": "cpu", "model.decoder.layers.2": "tpu"}, r"device_map\['model.decoder.layers.2'\]: unknown device 'tpu'"),
        ({"": "cpu", "model.decoder.layers.2.fc1": "disk"}, "a decoder layer is placed whole"),
        ({"": "cpu", "model.encoder": "cpu"}, "names no module of this model"),
        ({"model.decoder.layers": "cpu"}, "places no device for model.decoder.embed_tokens"),
        ({"": "cpu", "lm_head": "disk"}, "tied to model.decoder.embed_tokens"),
        ({"": "cpu", "model.decoder.embed_tokens": "disk"}, "only decoder layers can be offloaded"),
        ("disk", "only decoder layers can be offloaded"),
        ("balanced", "not supported"),
    ],
)
def test_bad_device_map_one_line(device_map, message):
    with pytest.raises(PlacementError, match=message) as e:
        plan_placement(CONFIG, Head.CAUSAL_LM, 4, device_map, {"cpu": 10**9})
    assert "\n" not in str(e.value)


def test_single_device_spellings():
    for spelled, device in (("cpu", "cpu"), ("cuda:1", 1), (0, 0)):
        plan = plan_placement(CONFIG, Head.CAUSAL_LM, 4, spelled)
        assert set(plan.devices.values()) == {device}
