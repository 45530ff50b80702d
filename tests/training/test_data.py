"""Framework-free data pipeline and training arguments: splits, packing, deterministic shuffling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opt_core.data import (
    SPECIAL_TOKENS,
    TextDataset,
    load_text_datasets,
    pack_blocks,
    read_text,
    split_text,
    tokenize_text,
    train_tokenizer,
)
from opt_core.tokenizer import OPTTokenizer
from opt_core.training_args import TrainingArguments, decays, perplexity

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))


@pytest.fixture(scope="module")
def tokenizer() -> OPTTokenizer:
    return train_tokenizer(TEXT, vocab_size=300)


def test_split_keeps_lines_whole_and_holds_out_the_tail():
    train, val = split_text(TEXT, 0.1)
    assert train + val == TEXT
    assert train.endswith("\n") and val.startswith("line ")
    assert abs(len(val) - 0.1 * len(TEXT)) < 60
    assert split_text(TEXT, 0.0) == (TEXT, "")
    with pytest.raises(ValueError, match="validation_fraction"):
        split_text(TEXT, 1.0)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_trained_tokenizer_has_opt_specials_and_round_trips(tokenizer, tmp_path):
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_ids_to_tokens([i]) == [tok]
    ids = tokenizer.encode("the quick brown fox")
    assert ids[0] == 2 and tokenizer.decode(ids[1:]) == "the quick brown fox"
    tokenizer.save_pretrained(tmp_path)
    again = OPTTokenizer.from_pretrained(tmp_path)
    assert again.encode("line 7: the lazy dog") == tokenizer.encode("line 7: the lazy dog")
    assert train_tokenizer(TEXT, vocab_size=300).encode(TEXT[:200]) == tokenizer.encode(TEXT[:200])


def test_pack_blocks_with_and_without_bos():
    ids = np.arange(10, 30)
    blocks = pack_blocks(ids, 5)
    assert blocks.shape == (5, 5) and (blocks[:, 0] == 2).all()
    np.testing.assert_array_equal(blocks[:, 1:].reshape(-1), ids)
    plain = pack_blocks(ids, 6, bos_token_id=None)
    assert plain.shape == (3, 6)
    np.testing.assert_array_equal(plain.reshape(-1), ids[:18])
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks(ids, 1)


def test_batches_are_deterministic_per_seed_and_epoch(tokenizer):
    ds = TextDataset.from_text(TEXT, tokenizer, block_size=16)
    assert len(ds) > 8 and ds.blocks.dtype == np.int64 and ds.block_size == 16
    a = [b.copy() for b in ds.batches(4, seed=3, epoch=0)]
    b = list(ds.batches(4, seed=3, epoch=0))
    c = list(ds.batches(4, seed=3, epoch=1))
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    assert len(a) == len(ds) // 4 and all(x.shape == (4, 16) for x in a)
    seen = np.concatenate(list(ds.batches(4, shuffle=False, drop_last=False)))
    np.testing.assert_array_equal(seen, ds.blocks)
    stream = ds.stream(4, seed=3)
    first_epoch = [next(stream) for _ in range(len(a))]
    assert all((x == y).all() for x, y in zip(first_epoch, a))
    assert (next(stream) == c[0]).all()
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(TextDataset(ds.blocks[:2]).stream(4))


def test_load_text_datasets_holds_out_the_end(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    train, val = load_text_datasets(path, tokenizer, block_size=8, validation_fraction=0.1)
    _, val_text = split_text(TEXT, 0.1)
    stream = tokenize_text(val_text, tokenizer)
    np.testing.assert_array_equal(val.blocks[0, 1:], stream[:7])
    assert len(train) > 5 * len(val) > 0


def test_training_arguments_schedule_and_validation():
    args = TrainingArguments(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert args.learning_rate_at(0) == pytest.approx(0.1)
    assert args.learning_rate_at(9) == pytest.approx(1.0)
    assert args.learning_rate_at(10) == pytest.approx(1.0)
    assert args.learning_rate_at(55) == pytest.approx(0.55)
    assert args.learning_rate_at(100) == pytest.approx(0.1)
    lin = args.replace(lr_schedule="linear")
    assert lin.learning_rate_at(55) == pytest.approx(0.55)
    assert args.replace(lr_schedule="constant").learning_rate_at(99) == 1.0
    assert TrainingArguments.from_dict(args.to_dict()) == args
    assert args.tokens_per_step == 16 * 256
    for bad in (dict(max_steps=0), dict(lr_schedule="step"), dict(learning_rate=0.0), dict(adam_beta2=1.0),
                dict(max_grad_norm=0.0), dict(block_size=1)):
        with pytest.raises(ValueError, match="TrainingArguments"):
            TrainingArguments(**bad)
    with pytest.raises(ValueError, match="unknown"):
        TrainingArguments.from_dict({"lr": 1})
    assert decays((3, 4)) and not decays((4,))
    assert perplexity(2 * math.log(5.0), 2) == pytest.approx(5.0)
