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


# ---------------------------------------------------------------- return_tensors and BatchEncoding
TEXTS = ["Hello, my dog is cute", "a"]


@pytest.mark.oracle
def test_return_tensors_none_gives_hugging_faces_lists(tok, tokenizer_dir):
    # oracle_tokenize is Hugging Face's `tok(text)["input_ids"]` with its default return_tensors=None.
    expected = oracle_tokenize(tokenizer_dir, TEXTS)
    one = tok(TEXTS[0], return_tensors=None)
    assert one["input_ids"] == expected[0] and one["attention_mask"] == [1] * len(expected[0])
    ragged = tok(TEXTS, return_tensors=None)  # no padding: rows keep their own lengths
    assert ragged.input_ids == expected and [len(m) for m in ragged.attention_mask] == [len(r) for r in expected]
    padded = tok(TEXTS, padding=True, padding_side="left", return_tensors=None)
    width = len(expected[0])
    assert padded.input_ids[1] == [tok.pad_token_id] * (width - len(expected[1])) + expected[1]
    assert all(type(i) is int for row in padded.input_ids for i in row)


def test_batch_encoding_reads_keys_as_attributes(tok):
    enc = tok(TEXTS, padding=True)
    assert isinstance(enc, dict) and list(enc) == ["input_ids", "attention_mask"]
    assert enc.input_ids is enc["input_ids"] and enc.attention_mask is enc["attention_mask"]
    assert dict(**enc).keys() == {"input_ids", "attention_mask"}
    with pytest.raises(AttributeError, match="token_type_ids.*input_ids"):
        enc.token_type_ids  # noqa: B018


def test_return_tensors_np_is_the_default(tok):
    default, np_ = tok(TEXTS, padding=True), tok(TEXTS, padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        assert isinstance(np_[key], np.ndarray) and np_[key].dtype == np.int64
        np.testing.assert_array_equal(default[key], np_[key])
    assert np_["input_ids"][0].tolist() == tok.encode(TEXTS[0])


@pytest.mark.parametrize("return_tensors, module", [
    pytest.param("pt", "torch", marks=pytest.mark.torch),
    pytest.param("tf", "tensorflow", marks=pytest.mark.tf),
    pytest.param("jax", "jax", marks=pytest.mark.flax),
])
def test_return_tensors_gives_the_frameworks_array(tok, return_tensors, module):
    enc = tok(TEXTS, padding=True, padding_side="left", return_tensors=return_tensors)
    reference = tok(TEXTS, padding=True, padding_side="left")
    for key in ("input_ids", "attention_mask"):
        assert type(enc[key]).__module__.split(".")[0] in (module, "jaxlib"), type(enc[key])
        np.testing.assert_array_equal(np.asarray(enc[key]), reference[key])
    if module != "jax":  # JAX keeps its default int32 unless x64 is enabled, as with Hugging Face
        assert "int64" in str(enc["input_ids"].dtype)
    assert tuple(tok(TEXTS[0], return_tensors=return_tensors)["input_ids"].shape) == (1, 7)


def test_return_tensors_refuses_what_it_cannot_make(tok):
    with pytest.raises(ValueError, match="return_tensors='torch' is unknown.*'pt'"):
        tok(TEXTS, padding=True, return_tensors="torch")
    with pytest.raises(ValueError, match="padding=True"):
        tok(TEXTS, return_tensors="np")


def test_a_missing_framework_is_a_clear_import_error(tok, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    with pytest.raises(ImportError, match="return_tensors='tf' needs TensorFlow.*not installed"):
        tok(TEXTS, padding=True, return_tensors="tf")


def test_opt_core_imports_no_framework_for_the_tokenizer():
    import subprocess
    import sys

    code = ("import sys; from opt_core import OPTTokenizer; from opt_core.tokenizer import BatchEncoding; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.torch
def test_to_moves_torch_tensors_in_place(tok):
    import torch

    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert enc.to("meta") is enc  # meta: a device other than the CPU that every machine has
    assert {v.device.type for v in enc.values()} == {"meta"}
    again = tok(TEXTS, padding=True, return_tensors="pt")
    assert again.to(torch.device("cpu")).input_ids.device.type == "cpu"
    with pytest.raises(TypeError, match="input_ids is a numpy.ndarray.*return_tensors='pt'"):
        tok(TEXTS, padding=True).to("cpu")


def test_encode_takes_return_tensors_too(tok):
    ids = tok.encode(TEXTS[0], return_tensors="np")
    assert ids.shape == (1, 7) and ids.dtype == np.int64 and ids[0].tolist() == tok.encode(TEXTS[0])
    assert tok.encode(TEXTS[0], add_special_tokens=False, return_tensors="np")[0].tolist() == tok.encode(TEXTS[0])[1:]
    with pytest.raises(ValueError, match="return_tensors='pytorch' is unknown"):
        tok.encode(TEXTS[0], return_tensors="pytorch")
