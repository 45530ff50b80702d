"""Values that would make a run silently wrong or unbounded are refused, each error naming the value,
where it came from and the limit: generation limits and float ranges, right padding, config floats."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from opt_core import GenerationConfig, OPTConfig, resolve_generation_options
from opt_core.generation import reference_generate, warp_logits
from opt_core.generation_config import MAX_NUM_BEAMS, MIN_SCALE
from opt_core.inputs import RIGHT_PADDING_WARNING, validate_inputs
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from tests.variants import VARIANTS

CONFIG = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                   max_position_embeddings=40, word_embed_proj_dim=16, eos_token_id=2, pad_token_id=1)


def resolve(gen=None, prompt_length=4, **kw):
    return resolve_generation_options(CONFIG, gen, prompt_length=prompt_length, **kw)


def write_generation_config(folder, **fields):
    (folder / "generation_config.json").write_text(json.dumps(fields))
    return folder


# ---------------------------------------------------------------- generation limits
def test_num_beams_has_a_limit_that_names_itself(tmp_path):
    assert resolve(num_beams=MAX_NUM_BEAMS).num_beams == MAX_NUM_BEAMS
    with pytest.raises(ValueError, match=r"num_beams must be an integer in \[1, 256\] \(the limit MAX_NUM_BEAMS"):
        resolve(num_beams=MAX_NUM_BEAMS + 1)
    # from the file: refused when the file is read, naming the file and the field
    write_generation_config(tmp_path, num_beams=10**6)
    with pytest.raises(ValueError, match=r"generation_config.json: num_beams .* MAX_NUM_BEAMS.*got 1000000"):
        GenerationConfig.from_pretrained(tmp_path, CONFIG)
    # and from a config built in code, at generate time, saying where the value came from
    with pytest.raises(ValueError, match=r"num_beams \(from the generation config\) .*got 1000000"):
        resolve(GenerationConfig(num_beams=10**6))


def test_max_new_tokens_from_the_file_is_bounded_by_the_positions(tmp_path):
    with pytest.raises(ValueError, match=r"max_new_tokens \(from the generation config\) 1000000 .*"
                                         r"exceeds max_position_embeddings \(40\)"):
        resolve(GenerationConfig(max_new_tokens=10**6))
    with pytest.raises(ValueError, match=r"max_new_tokens \(from the generation config\) 999996 .*exceeds"):
        resolve(GenerationConfig(max_length=10**6))


@pytest.mark.parametrize("field, value, message", [
    ("max_length", "20", "max_length must be an integer >= 0, got '20'"),
    ("max_length", 12.5, "max_length must be an integer >= 0, got 12.5"),
    ("min_length", [3], "min_length must be an integer >= 0, got list"),
    ("max_new_tokens", True, "max_new_tokens must be an integer"),
    ("temperature", "hot", "temperature must be a number, got 'hot'"),
    ("do_sample", "yes", "do_sample must be true or false"),
    ("top_p", 0, r"top_p must be in \(0, 1\]"),
    ("pad_token_id", -4, "pad_token_id must be an integer >= 0"),
    ("max_length", "x" * 10_000, "max_length must be an integer >= 0, got 'xxxx"),
])
def test_wrong_typed_file_fields_are_named_with_the_file(tmp_path, field, value, message):
    write_generation_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=message) as e:
        GenerationConfig.from_pretrained(tmp_path, CONFIG)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "generation_config.json") + ": ")
    assert len(text) < 300 and "\n" not in text  # one bounded line, even for a 10 kB value


def test_wrong_typed_max_length_in_code_is_named_at_generate_time():
    with pytest.raises(ValueError, match=r"max_length \(from the generation config\) must be an integer"):
        resolve(GenerationConfig(max_length="20"))
    with pytest.raises(ValueError, match=r"min_length \(from the generation config\) must be an integer"):
        resolve(GenerationConfig(min_length=2.5))


def test_invalid_utf8_generation_config_is_one_line(tmp_path):
    (tmp_path / "generation_config.json").write_bytes(b'{"top_k": "\xff"}')
    with pytest.raises(ValueError, match=r"generation_config.json is not valid UTF-8"):
        GenerationConfig.from_pretrained(tmp_path, CONFIG)


# ---------------------------------------------------------------- float ranges keep float32 finite
@pytest.mark.parametrize("kw, message", [
    (dict(do_sample=True, temperature=1e-40), r"temperature must be in \[1e-06, 1e\+06\] \(so float32 logits"),
    (dict(do_sample=True, temperature=1e300), r"temperature must be in \[1e-06, 1e\+06\]"),
    (dict(repetition_penalty=1e-40), r"repetition_penalty must be in \[1e-06, 1e\+06\]"),
    (dict(repetition_penalty=1e30), r"repetition_penalty must be in \[1e-06, 1e\+06\]"),
    (dict(length_penalty=-1e3), r"length_penalty must be in \[-10, 10\]"),
    (dict(length_penalty=10**400), "length_penalty must be a finite number"),
])
def test_floats_outside_float32_safe_ranges_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        resolve(**kw)


def test_the_temperature_bounds_are_what_keeps_sampling_finite():
    """Why MIN_SCALE: the smallest accepted temperature leaves ordinary logits finite (and sampling at
    it is greedy), while the refused 1e-40 overflows them, which is what made sampled tokens differ."""
    logits = np.array([[10.0, 9.0, -3.0, 0.5]], dtype=np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(warp_logits(logits, 1e-40, 0, 1.0)).all()
    assert np.isfinite(warp_logits(logits, MIN_SCALE, 0, 1.0)).all()
    assert resolve(do_sample=True, temperature=MIN_SCALE).temperature == MIN_SCALE
    # greedy never divides by the temperature: a tiny value from a file is ignored there, as in HF
    assert resolve(GenerationConfig(temperature=1e-40)).do_sample is False


def test_sampling_at_the_smallest_temperature_is_greedy():
    cfg = VARIANTS["pre_ln"]
    model = ReferenceOPTForCausalLM(cfg, random_parameters(cfg))
    ids = np.array([[2, 7, 9, 11]])
    greedy = reference_generate(model, ids, max_new_tokens=5, eos_token_id=[])
    sampled = reference_generate(model, ids, max_new_tokens=5, eos_token_id=[], do_sample=True,
                                 temperature=MIN_SCALE, top_k=0, seed=3)
    np.testing.assert_array_equal(sampled, greedy)


# ---------------------------------------------------------------- pad_token_id inside the vocabulary
def test_out_of_vocabulary_pad_token_id_is_an_error():
    with pytest.raises(ValueError, match=r"pad_token_id 64 is outside the vocabulary \[0, 64\)"):
        resolve(pad_token_id=64)
    with pytest.raises(ValueError, match=r"pad_token_id \(from the generation config\) 1000 is outside"):
        resolve(GenerationConfig(pad_token_id=1000))
    assert resolve(pad_token_id=63).pad_token_id == 63


# ---------------------------------------------------------------- right padding warns, as in HF
def test_right_padded_prompts_get_hugging_faces_warning():
    ids = np.array([[2, 5, 6], [2, 7, 1]])
    right = np.array([[1, 1, 1], [1, 1, 0]])
    left = np.array([[1, 1, 1], [0, 1, 1]])
    with pytest.warns(UserWarning, match="right-padding was detected") as record:
        validate_inputs(ids, right, CONFIG, generating=True)
    assert str(record[0].message) == RIGHT_PADDING_WARNING
    with pytest.warns(UserWarning, match="padding_side='left'"):  # no mask: HF's own test on the pad id
        validate_inputs(ids, None, CONFIG, generating=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_inputs(ids[:, ::-1].copy() * 0 + 5, left, CONFIG, generating=True)
        validate_inputs(ids, right, CONFIG)  # a forward pass (training, scoring) may be right-padded
        validate_inputs(ids[:1], None, CONFIG, generating=True)


def test_reference_generate_warns_on_right_padding():
    cfg = VARIANTS["pre_ln"]
    model = ReferenceOPTForCausalLM(cfg, random_parameters(cfg))
    with pytest.warns(UserWarning, match="right-padding was detected"):
        reference_generate(model, np.array([[2, 5, 6], [2, 7, 1]]), np.array([[1, 1, 1], [1, 1, 0]]),
                           max_new_tokens=1)


# ---------------------------------------------------------------- config floats
@pytest.mark.parametrize("text, message", [
    ("Infinity", r"init_std must be a number in \[0, 10\], got inf"),
    ("NaN", r"init_std must be a number in \[0, 10\], got nan"),
    ("-0.5", r"init_std must be a number in \[0, 10\]"),
    ('"0.02"', r"init_std must be a number in \[0, 10\], got '0.02'"),
    ("true", r"init_std must be a number"),
])
def test_init_std_that_is_not_finite_is_refused_naming_the_file(tmp_path, text, message):
    d = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).to_dict()
    raw = json.dumps(d).replace('"init_std": 0.02', f'"init_std": {text}')
    (tmp_path / "config.json").write_text(raw)
    with pytest.raises(ValueError, match=message) as e:
        OPTConfig.from_pretrained(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json"))


def test_dropout_that_is_a_bool_or_nan_is_refused():
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\], got nan"):
        OPTConfig(dropout=float("nan"))
    with pytest.raises(ValueError, match=r"dropout must be a probability"):
        OPTConfig(dropout=True)


def test_config_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": 16, "x": "\xff"}')
    with pytest.raises(ValueError, match=r"config.json is not valid UTF-8 \(invalid start byte at byte 26\)"):
        OPTConfig.from_pretrained(tmp_path)


def test_a_weights_file_given_as_the_config_path_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"model.safetensors is a weights file; from_pretrained takes the model"):
        OPTConfig.from_pretrained(tmp_path / "model.safetensors")


def test_config_argument_accepts_a_dict_and_names_a_wrong_type(tmp_path):
    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    assert OPTConfig.from_argument(cfg.to_dict(), tmp_path) == cfg
    assert OPTConfig.from_argument(cfg, tmp_path) is cfg
    with pytest.raises(TypeError, match="config= must be an OPTConfig, a dict like config.json or a path, got list"):
        OPTConfig.from_argument([1], tmp_path)
    with pytest.raises(ValueError, match=r"config= \(a dict\): OPTConfig.hidden_size must be positive"):
        OPTConfig.from_argument({**cfg.to_dict(), "hidden_size": -1}, tmp_path)
