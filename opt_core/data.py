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

import codecs
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opt_core.tokenizer import OPTTokenizer

# OPT's (fairseq's) special tokens and their ids.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


# ---------------------------------------------------------------- text
# Texts are read and tokenized in pieces of about this many characters, so a text of any size costs
# memory for its token ids only (the tokenizers library keeps ~100 bytes per token of a whole encoding).
TEXT_PIECE_CHARS = 1 << 20
_READ_BYTES = 1 << 20
# A piece ends before one space or line break that sits between two non-space characters: GPT-2's
# pre-tokenizer splits there anyway (the space starts the next word; a lone line break is a word of
# its own), so tokenizing piece by piece gives exactly the tokens of the whole text.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


def check_text_file(path: str | os.PathLike[str], what: str = "text file") -> Path:
    """`path` if it is a regular file; looked at with `stat` only, never opened (a FIFO would block
    and a device never end).

    Raises:
        FileNotFoundError: nothing is there.
        IsADirectoryError: a folder.
        ValueError: a FIFO, a device or a socket.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{what} {path} does not exist (a part of the path is a file)") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a folder, not a text file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ValueError(f"{what} {path} is {kind}, not a text file")
    return path


def iter_text(path: str | os.PathLike[str], what: str = "text file") -> Iterator[str]:
    """The UTF-8 text of a file in consecutive pieces of about `TEXT_PIECE_CHARS` characters, each
    cut where tokenizing piece by piece gives the tokens of the whole (see `_SAFE_CUT`).

    Raises (on the first piece that shows it):
        FileNotFoundError / IsADirectoryError / ValueError: see `check_text_file`.
        ValueError: the file is not UTF-8, holds a NUL byte (a binary file), or is empty or blank.
    """
    path = check_text_file(path, what)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, buffer, blank = 0, "", True
    with open(path, "rb") as f:
        while True:
            raw = f.read(_READ_BYTES)
            nul = raw.find(b"\0")
            if nul != -1:
                raise ValueError(f"{what} {path} holds a NUL byte at offset {offset + nul}: a binary file, not text")
            pending = len(decoder.getstate()[0])  # bytes of a character split by the previous read
            try:
                buffer += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise ValueError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {at})") from None
            offset += len(raw)
            while len(buffer) > TEXT_PIECE_CHARS:
                # wait for more text when no safe cut is in sight yet, up to a hard ceiling
                cut = _cut_at(buffer, TEXT_PIECE_CHARS, final=not raw or len(buffer) > 16 * TEXT_PIECE_CHARS)
                if cut is None:
                    break
                blank = blank and not buffer[:cut].strip()
                yield buffer[:cut]
                buffer = buffer[cut:]
            if not raw:
                break
    if blank and not buffer.strip():
        raise ValueError(f"{what} {path} is empty" if offset == 0 else f"{what} {path} holds only white space")
    if buffer:
        yield buffer


def text_pieces(text: str, piece_chars: int | None = None) -> Iterator[str]:
    """`text` in consecutive pieces of about `piece_chars` (default `TEXT_PIECE_CHARS`) characters,
    cut as `iter_text` cuts."""
    piece_chars = piece_chars or TEXT_PIECE_CHARS
    while len(text) > piece_chars:
        cut = _cut_at(text, piece_chars)
        assert cut is not None
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _cut_at(text: str, near: int, final: bool = True) -> int | None:
    """The last safe cut in `text[:near]`, else the first after it. With none: `near` when `final`
    (a text without a space between words for a whole piece may then tokenize differently at that
    one boundary), None when more text may still bring one."""
    last = None
    for m in _SAFE_CUT.finditer(text, max(near - 4096, 1), near):
        last = m.start()
    if last is None:
        after = _SAFE_CUT.search(text, near)
        last = after.start() if after else (near if final else None)
    return last


def read_text(path: str | os.PathLike[str], what: str = "text file") -> str:
    """The UTF-8 text of a regular file.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        IsADirectoryError: it is a folder.
        ValueError: a FIFO or device; the file is empty, blank, binary (a NUL byte) or not UTF-8.
    """
    return "".join(iter_text(path, what))


def tokenize_file(
    path: str | os.PathLike[str], tokenizer: OPTTokenizer, max_tokens: int | None = None, what: str = "text file"
) -> np.ndarray:
    """Token ids of a text file, without the leading `</s>`: int64 [n_tokens], read and tokenized
    piece by piece and only until `max_tokens` ids exist (None: the whole file).

    Raises: as `iter_text`.
    """
    return _tokenize_pieces(iter_text(path, what), tokenizer, max_tokens)


def _tokenize_pieces(pieces: Iterator[str], tokenizer: OPTTokenizer, max_tokens: int | None) -> np.ndarray:
    parts, count = [], 0
    for piece in pieces:
        ids = np.asarray(tokenizer.encode(piece, add_special_tokens=False), dtype=np.int64)
        parts.append(ids)
        count += len(ids)
        if max_tokens is not None and count >= max_tokens:
            break
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids if max_tokens is None else ids[:max_tokens]


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
def tokenize_text(text: str, tokenizer: OPTTokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of a text, without the leading `</s>`: int64 [n_tokens], tokenized piece by piece
    (the same ids as the whole at once) and only until `max_tokens` ids exist (None: all)."""
    return _tokenize_pieces(text_pieces(text), tokenizer, max_tokens)


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
