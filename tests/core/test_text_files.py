"""Texts (calibration, eval-ppl, training corpora) are read and tokenized piece by piece, as far as
needed, with exactly the tokens of the whole text; odd files get one clear error naming them."""

from __future__ import annotations

import os
import random
import socket
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from opt_core import OPTTokenizer, data
from opt_core.data import check_text_file, iter_text, read_text, tokenize_file, tokenize_text

# The bundled model's byte-level BPE (a small vocabulary, so it loads fast); any GPT-2 BPE will do.
TOKENIZER_FOLDER = Path(data.__file__).parent / "bundled" / "opt-shakespeare"


@pytest.fixture(scope="module")
def tokenizer():
    return OPTTokenizer.from_pretrained(TOKENIZER_FOLDER)


def awkward_text(n_words: int, seed: int = 0) -> str:
    """Words, digits, punctuation, contractions, non-ASCII and every kind of white-space run, so a
    cut in the wrong place would change some token."""
    rng = random.Random(seed)
    words = ["the", "king", "hath", "said", "it's", "we'll", "naïve", "Ωmega", "x1", "2048", "...", "?!", "</s>",
             "long" * 7, "—", "中文", "😀", "a"]
    spaces = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\n ", "\t", "   \n\n  "]
    return "".join(rng.choice(words) + rng.choice(spaces) for _ in range(n_words))


@pytest.mark.parametrize("piece_chars", [7, 50, 333])
def test_piecewise_tokens_equal_the_whole_texts(tokenizer, monkeypatch, tmp_path, piece_chars):
    text = awkward_text(3000, seed=piece_chars)
    whole = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    monkeypatch.setattr(data, "TEXT_PIECE_CHARS", piece_chars)
    monkeypatch.setattr(data, "_READ_BYTES", 97)  # reads split multi-byte characters too
    assert len(list(data.text_pieces(text))) > 10
    np.testing.assert_array_equal(tokenize_text(text, tokenizer), whole)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert read_text(path) == text
    np.testing.assert_array_equal(tokenize_file(path, tokenizer), whole)
    np.testing.assert_array_equal(tokenize_file(path, tokenizer, max_tokens=100), whole[:100])


def test_a_large_text_is_tokenized_only_as_far_as_needed(tokenizer, tmp_path):
    """A 40 MB text: the first 2,048 tokens are read from its first pieces only, in little time and
    memory (tokenizing it whole takes gigabytes in the tokenizers library)."""
    path = tmp_path / "big.txt"
    line = awkward_text(200, seed=1).replace("\n", " ") + "\n"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(40_000_000 // len(line.encode())):
            f.write(line)
    tracemalloc.start()
    try:
        ids = tokenize_file(path, tokenizer, max_tokens=2048)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids.shape == (2048,)
    np.testing.assert_array_equal(ids, tokenizer.encode(path.read_text()[: 40_000], add_special_tokens=False)[:2048])
    assert peak < 40 * 2**20  # a few pieces of 1 M characters, not the 40 MB text


@pytest.mark.parametrize("content, message", [
    (b"", r"text file .*t.txt is empty"),
    (b" \n\t\n", r"text file .*t.txt holds only white space"),
    (b"hello\x00world", r"holds a NUL byte at offset 5: a binary file, not text"),
    (b"\x7fELF\x02\x01\x01\x00\x00", r"holds a NUL byte at offset 7"),
    (b"caf\xc3", r"is not UTF-8 text \(unexpected end of data at byte 3\)"),
    (b"ok \xff ok", r"is not UTF-8 text \(invalid start byte at byte 3\)"),
])
def test_empty_binary_or_non_utf8_texts_are_named(tmp_path, content, message):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_text(path)
    assert "\\x" not in str(e.value)  # no bytes of the refused file in the message


def test_special_files_are_refused_by_type_without_opening(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"calibration text .*nope.txt does not exist"):
        check_text_file(tmp_path / "nope.txt", "calibration text")
    with pytest.raises(IsADirectoryError, match=r"calibration text .* is a folder, not a text file"):
        check_text_file(tmp_path, "calibration text")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"calibration text .*fifo is a FIFO \(named pipe\), not a text file"):
        list(iter_text(fifo, "calibration text"))  # would block forever if it were opened
    with pytest.raises(ValueError, match=r"text file /dev/zero is a device, not a text file"):
        read_text("/dev/zero")
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(ValueError, match="is a socket"):
            read_text(sock_path)
