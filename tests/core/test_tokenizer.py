"""OPTTokenizer on OPT's real vocabulary, against Hugging Face's GPT2Tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import OPTTokenizer
from tests.conftest import CORPUS_DIR
from tests.oracle import oracle_tokenize


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return OPTTokenizer.from_pretrained(tokenizer_dir)


def test_documented_example(tok):
    assert tok.encode("Hello, my dog is cute") == [2, 31414, 6, 127, 2335, 16, 11962]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, len(tok)) == (2, 1, 2, 50265)


@pytest.mark.oracle
def test_every_wikitext_line_matches_hf(tok, tokenizer_dir):
    lines = (CORPUS_DIR / "wikitext2-test.txt").read_text(encoding="utf-8").split("\n")
    expected = oracle_tokenize(tokenizer_dir, lines)
    mismatches = [i for i, (line, ids) in enumerate(zip(lines, expected)) if tok.encode(line) != ids]
    assert len(expected) == len(lines) > 10000
    assert not mismatches, f"{len(mismatches)} lines differ, first: line {mismatches[0]}"


def test_batch_padding_left_and_right(tok):
    left = tok(["a", "longer text here"], padding=True, padding_side="left")
    right = tok(["a", "longer text here"], padding=True, padding_side="right")
    assert left["input_ids"].dtype == np.int64
    assert left["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert left["input_ids"][0].tolist() == [1, 1, 1, 2, tok.encode("a", add_special_tokens=False)[0]]
    assert right["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert right["input_ids"][1].tolist() == left["input_ids"][1].tolist()


def test_decode_round_trip(tok):
    text = "The quick brown fox, 1234 \u00e9t\u00e9 \u4f60\u597d!  Two spaces."
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids).startswith("</s>")
    assert tok.batch_decode(np.array([ids, ids]), skip_special_tokens=True) == [text, text]


def test_special_tokens_in_text_stay_whole(tok):
    assert tok.encode("a</s>b", add_special_tokens=False)[1] == 2


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = OPTTokenizer.from_pretrained(tmp_path)
    text = "Saving keeps every merge."
    assert again.encode(text) == tok.encode(text)


def test_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "vocab.json").write_text("{}")
        OPTTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "bb cc dd"])
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding=True, padding_side="middle")
