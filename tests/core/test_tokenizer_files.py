"""Broken tokenizer files and impossible ids: one clear line naming the file and what is wrong, never
a traceback from the tokenizers library; a degenerate vocabulary is refused, not used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opt_core import OPTTokenizer

VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "c": 7}
MERGES = "#version: 0.2\na b\n"


def folder_with(tmp_path, vocab=None, merges=None, config=None, raw_vocab=None):
    (tmp_path / "vocab.json").write_text(raw_vocab if raw_vocab is not None else json.dumps(vocab or VOCAB))
    (tmp_path / "merges.txt").write_text(MERGES if merges is None else merges)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(config)
    return tmp_path


def test_the_fixture_itself_loads_and_round_trips(tmp_path):
    tok = OPTTokenizer.from_pretrained(folder_with(tmp_path))
    ids = tok.encode("abc")
    assert ids == [2, 6, 7]
    assert tok.decode(ids, skip_special_tokens=True) == "abc"


@pytest.mark.parametrize("vocab, message", [
    ({**{t: 0 for t in VOCAB}}, r"vocabulary ids must be distinct: '<s>' and '<pad>' both have id 0"),
    ({**VOCAB, "d": 4}, r"'a' and 'd' both have id 4"),
    ({**VOCAB, "d": -1}, r"vocabulary id of 'd' must be an integer in \[0, 2\*\*32\), got -1"),
    ({**VOCAB, "d": "9"}, r"vocabulary id of 'd' must be an integer"),
    ({**VOCAB, "d": 2**40}, r"vocabulary id of 'd' must be an integer in \[0, 2\*\*32\)"),
])
def test_degenerate_or_malformed_vocabulary_is_refused(tmp_path, vocab, message):
    with pytest.raises(ValueError, match=message) as e:
        OPTTokenizer.from_pretrained(folder_with(tmp_path, vocab=vocab))
    assert str(e.value).startswith(f"tokenizer in {tmp_path}: ")


@pytest.mark.parametrize("kind, message", [
    ("vocab_list", r"vocab.json must hold a JSON object, not an array"),
    ("vocab_bad_json", r"vocab.json is not valid JSON"),
    ("vocab_not_utf8", r"vocab.json is not valid UTF-8"),
    ("vocab_deep", r"vocab.json nests JSON 100000 levels deep; the limit is 64"),
    ("merge_three", r"merges.txt line 2 is not a merge pair"),
    ("merge_unknown", r"merge 1 \('a z'\) uses 'z', which is not in the vocabulary"),
    ("merges_not_utf8", r"merges.txt is not valid UTF-8 text"),
    ("config_bad_json", r"tokenizer_config.json is not valid JSON"),
    ("config_list", r"tokenizer_config.json must hold a JSON object"),
    ("config_unknown_pad", r"pad token '<nope>' is not in the vocabulary"),
])
def test_malformed_tokenizer_files_give_one_clear_line(tmp_path, kind, message):
    files = {
        "vocab_list": dict(raw_vocab="[1, 2]"),
        "vocab_bad_json": dict(raw_vocab='{"a": 1,'),
        "vocab_deep": dict(raw_vocab="[" * 100_000 + "]" * 100_000),
        "merge_three": dict(merges="#version: 0.2\na b c\n"),
        "merge_unknown": dict(merges="a z\n"),
        "config_bad_json": dict(config="{"),
        "config_list": dict(config="[]"),
        "config_unknown_pad": dict(config=json.dumps({"pad_token": "<nope>"})),
    }
    folder = folder_with(tmp_path, **files.get(kind, {}))
    if kind == "vocab_not_utf8":
        (tmp_path / "vocab.json").write_bytes(b'{"\xff": 1}')
    if kind == "merges_not_utf8":
        (tmp_path / "merges.txt").write_bytes(b"a \xfe\n")
    with pytest.raises(ValueError, match=message) as e:
        OPTTokenizer.from_pretrained(folder)
    text = str(e.value)
    assert "\n" not in text and len(text) < 400
    assert str(tmp_path) in text  # names where the bad file is


@pytest.mark.parametrize("ids, message", [
    ([2**32], r"token id 4294967296 is outside \[0, 2\*\*32\)"),
    ([4, -1], r"token id -1 is outside"),
    ([4, 1.5], "token ids must be integers, got 1.5"),
    (np.array([4, 2**40], dtype=np.int64), r"token id 1099511627776 is outside"),
])
def test_decode_of_impossible_ids_is_a_clear_error(tmp_path, ids, message):
    tok = OPTTokenizer.from_pretrained(folder_with(tmp_path))
    with pytest.raises(ValueError, match=message):
        tok.decode(ids)
    with pytest.raises(ValueError, match=message):
        tok.batch_decode([ids])


def test_ids_beyond_the_tokenizer_but_inside_the_model_table_decode_to_nothing(tmp_path):
    """A model's vocab_size pads the tokenizer's (50272 vs 50265): generated ids there are not errors."""
    tok = OPTTokenizer.from_pretrained(folder_with(tmp_path))
    assert tok.decode([4, 9, 5]) == "ab"


@pytest.mark.tf
def test_decode_takes_tf_tensors():
    import tensorflow as tf

    from opt_core import OPTTokenizer, bundled

    tok = OPTTokenizer.from_pretrained(bundled.path())
    ids = tok("ROMEO: what light")["input_ids"]
    assert tok.batch_decode(tf.constant(ids)) == tok.batch_decode(ids)
    assert tok.decode(tf.constant(ids[0])) == tok.decode(ids[0])
