"""Text datasets for causal-LM training, framework-free: the same blocks feed every backend.

    text = read_text("corpus.txt")
    train_text, val_text = split_text(text, validation_fraction=0.1)   # the last 10% is held out
    tok = train_tokenizer(train_text, vocab_size=4096)                 # byte-level BPE, OPT's specials
    train = TextDataset.from_text(train_text, tok, block_size=256)
    for batch in train.batches(batch_size=16, seed=0, epoch=0):        # int64 [16, 256]
        ...

A block is `</s>` followed by `block_size - 1` consecutive tokens of the stream, so every training
row starts the way an OPT prompt does (the tokenizer prepends `</s>`); the model learns to predict
every token after the first. Shuffling is a pure function of (seed, epoch), so two backends given the
same seed see the same batches in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opt_core.tokenizer import OPTTokenizer

# OPT's (fairseq's) special tokens and their ids.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


# ---------------------------------------------------------------- text
def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of a file.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file is empty or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def split_text(text: str, validation_fraction: float = 0.1) -> tuple[str, str]:
    """Split `text` into (train, validation): validation is the last `validation_fraction` of the
    characters, starting at the first line break at or after the cut so no line is split.

    Raises:
        ValueError: the fraction is outside [0, 1) or leaves nothing to train on.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0.0:
        return text, ""
    cut = int(len(text) * (1.0 - validation_fraction))
    newline = text.find("\n", cut)
    if newline != -1:
        cut = newline + 1
    if cut == 0:
        raise ValueError("the validation split leaves no training text")
    return text[:cut], text[cut:]


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(text: str, vocab_size: int = 4096, min_frequency: int = 2) -> OPTTokenizer:
    """Train a GPT-2-style byte-level BPE on `text` with OPT's special tokens at ids 0-3
    (`<s>`, `<pad>`, `</s>`, `<unk>`); the result prepends `</s>` like OPT's tokenizer.

    The merges are deterministic for a given text and vocab size. Save with `save_pretrained`; the
    folder then loads in `OPTTokenizer` and in Hugging Face's `GPT2Tokenizer`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer, length=None)
    vocab = tok.get_vocab()
    for i, special in enumerate(SPECIAL_TOKENS):
        assert vocab[special] == i, f"{special} got id {vocab[special]}, expected {i}"
    import json

    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    pairs = [tuple(m.split(" ")) for m in merges]
    return OPTTokenizer(vocab, pairs)  # type: ignore[arg-type]


def _chunks(text: str, lines_per_chunk: int = 64) -> Iterator[str]:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[i : i + lines_per_chunk])


# ---------------------------------------------------------------- blocks
def tokenize_text(text: str, tokenizer: OPTTokenizer) -> np.ndarray:
    """Token ids of a whole text, without the leading `</s>`: int64 [n_tokens]."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)


def pack_blocks(ids: np.ndarray, block_size: int, bos_token_id: int | None = 2) -> np.ndarray:
    """Cut a token stream into rows of exactly `block_size` tokens; the tail that does not fill a
    row is dropped.

    Args:
        ids: int [n_tokens], the stream.
        bos_token_id: when not None, every row is this id followed by `block_size - 1` stream tokens
            (OPT prompts start with `</s>`); None packs `block_size` stream tokens per row.
    Returns:
        int64 [n_blocks, block_size].
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    body = block_size - (bos_token_id is not None)
    n = len(ids) // body
    rows = ids[: n * body].reshape(n, body)  # (n_blocks, body)
    if bos_token_id is not None:
        rows = np.concatenate([np.full((n, 1), bos_token_id, dtype=np.int64), rows], axis=1)
    return rows


def shuffled_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of `n` rows used in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class TextDataset:
    """Packed fixed-length blocks of one text, int64 [n_blocks, block_size]."""

    blocks: np.ndarray

    @classmethod
    def from_text(
        cls, text: str, tokenizer: OPTTokenizer, block_size: int, bos_each_block: bool = True
    ) -> TextDataset:
        bos = tokenizer.bos_token_id if bos_each_block else None
        return cls(pack_blocks(tokenize_text(text, tokenizer), block_size, bos))

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.blocks.size)

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def batches(
        self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[np.ndarray]:
        """One pass over the blocks: int64 [batch_size, block_size] arrays (the last one smaller
        when `drop_last` is False)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = shuffled_order(len(self), seed, epoch) if shuffle else np.arange(len(self))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield self.blocks[order[start : start + batch_size]]

    def stream(self, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
        """Endless training batches: epoch after epoch, each reshuffled by (seed, epoch).

        Raises:
            ValueError: fewer blocks than one batch.
        """
        if len(self) < batch_size:
            raise ValueError(
                f"the dataset has {len(self)} blocks of {self.block_size} tokens, fewer than one batch "
                f"of {batch_size}; use a longer text, a smaller block_size or a smaller batch_size"
            )
        epoch = 0
        while True:
            yield from self.batches(batch_size, seed=seed, epoch=epoch)
            epoch += 1


def load_text_datasets(
    path: str | os.PathLike[str],
    tokenizer: OPTTokenizer,
    block_size: int,
    validation_fraction: float = 0.1,
    bos_each_block: bool = True,
) -> tuple[TextDataset, TextDataset]:
    """(train, validation) datasets of a text file; validation is its last `validation_fraction`."""
    train_text, val_text = split_text(read_text(path), validation_fraction)
    train = TextDataset.from_text(train_text, tokenizer, block_size, bos_each_block)
    val = TextDataset.from_text(val_text, tokenizer, block_size, bos_each_block)
    return train, val


@dataclass(frozen=True)
class ArrayDataset:
    """Rows of named arrays that share their first dimension (fine-tuning data: `input_ids`,
    `attention_mask`, `labels`, `start_positions`...), batched like `TextDataset`."""

    arrays: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        sizes = {name: len(a) for name, a in self.arrays.items()}
        if not sizes:
            raise ValueError("ArrayDataset needs at least one array")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ArrayDataset arrays have different numbers of rows: {sizes}")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(
        self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[dict[str, np.ndarray]]:
        """One pass: dicts of arrays with `batch_size` rows each."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = shuffled_order(len(self), seed, epoch) if shuffle else np.arange(len(self))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            rows = order[start : start + batch_size]
            yield {name: a[rows] for name, a in self.arrays.items()}

    def stream(self, batch_size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches, reshuffled every epoch by (seed, epoch)."""
        if len(self) < batch_size:
            raise ValueError(f"the dataset has {len(self)} rows, fewer than one batch of {batch_size}")
        epoch = 0
        while True:
            yield from self.batches(batch_size, seed=seed, epoch=epoch)
            epoch += 1
