"""`OPTTokenizer`: OPT's GPT-2 byte-level BPE with fairseq ids, on the `tokenizers` library.

Like Hugging Face's `GPT2Tokenizer` for OPT: `</s>` (id 2) is prepended to every prompt, special
tokens written in the text are kept whole, and padding is `<pad>` (id 1) on the side asked for.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, overload

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_MERGES_BYTES = 32 * 1024 * 1024  # OPT's merges.txt is 456 KB
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# `return_tensors` value -> (module imported on demand, the framework's name for the error message).
# opt_core imports no framework at import time: each is imported only when asked for.
TENSOR_TYPES = {"np": None, "pt": ("torch", "PyTorch"), "tf": ("tensorflow", "TensorFlow"), "jax": ("jax.numpy", "JAX")}


def _framework(module: str, framework: str, return_tensors: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"return_tensors={return_tensors!r} needs {framework} ({module.split('.')[0]}), which is not "
            "installed here; install it, or use return_tensors='np' (NumPy) or None (lists)"
        ) from None


class BatchEncoding(dict):
    """What the tokenizer returns, as Hugging Face's `BatchEncoding`: a dict of `input_ids` and
    `attention_mask` whose keys also read as attributes (`enc.input_ids`), so `model(**enc)` and
    `model.generate(**enc)` take it as it is in every backend.

    The values are lists (`return_tensors=None`), NumPy arrays ("np"), or torch ("pt"), TensorFlow
    ("tf") or JAX ("jax") arrays; `.to(device)` moves torch tensors.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r}; its keys are {list(self)}") from None

    def convert_to_tensors(self, return_tensors: str | None) -> BatchEncoding:
        """Turn the values (lists or NumPy int64 arrays) into `return_tensors` arrays in place;
        None leaves them as they are. Returns self.

        Raises:
            ValueError: an unknown `return_tensors`, or ragged rows (pad them to make a tensor).
            ImportError: the framework asked for is not installed.
        """
        if return_tensors is None:
            return self
        if return_tensors not in TENSOR_TYPES:
            raise ValueError(
                f"return_tensors={return_tensors!r} is unknown; expected one of {list(TENSOR_TYPES)} or None (lists)"
            )
        arrays = {}
        for key, value in self.items():
            try:
                arrays[key] = np.asarray(value, dtype=np.int64)
            except ValueError:
                raise ValueError(
                    f"cannot make a {return_tensors!r} tensor of {key}: its rows have different lengths; "
                    "pass padding=True to pad them"
                ) from None
        spec = TENSOR_TYPES[return_tensors]
        if spec is not None:
            fw = _framework(*spec, return_tensors)
            if return_tensors == "pt":
                arrays = {k: fw.from_numpy(v) for k, v in arrays.items()}  # int64, as torch's LongTensor ids
            elif return_tensors == "tf":
                arrays = {k: fw.constant(v, dtype=fw.int64) for k, v in arrays.items()}
            else:  # JAX keeps its default integer width (int32 unless jax_enable_x64), as Hugging Face's "jax"
                arrays = {k: fw.asarray(v) for k, v in arrays.items()}
        self.update(arrays)
        return self

    def to(self, device: Any, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every torch tensor to `device` (a string, `torch.device` or index), in place, as
        Hugging Face does; returns self.

        Raises:
            TypeError: a value is not a torch tensor (ask the tokenizer for return_tensors="pt").
        """
        for key, value in self.items():
            if type(value).__module__.split(".")[0] != "torch" or not hasattr(value, "to"):
                raise TypeError(
                    f"BatchEncoding.to({device!r}) moves torch tensors, but {key} is a "
                    f"{type(value).__module__}.{type(value).__name__}; call the tokenizer with return_tensors='pt'"
                )
        for key, value in self.items():
            self[key] = value.to(device, non_blocking=non_blocking)
        return self



# The tokenizers library holds ids as unsigned 32-bit integers; anything else overflows inside it.
MAX_TOKEN_ID = 2**32 - 1


def _short(value: Any) -> str:
    """A bounded repr for messages (tokens and values come from files)."""
    text = repr(value) if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_vocab(vocab: Any) -> None:
    """Raise `ValueError` unless `vocab` maps token strings to distinct ids >= 0.

    Two tokens sharing an id cannot both be decoded, and a vocabulary that maps every token to one
    id encodes every text as that id: such a file is broken, not a tokenizer.
    """
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("the vocabulary must be a non-empty mapping of token -> id")
    owner: dict[int, str] = {}
    for token, i in vocab.items():
        if not isinstance(token, str):
            raise ValueError(f"vocabulary token {_short(token)} is not a string")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_TOKEN_ID:
            raise ValueError(f"vocabulary id of {_short(token)} must be an integer in [0, 2**32), got {_short(i)}")
        if i in owner:
            raise ValueError(
                f"vocabulary ids must be distinct: {_short(owner[i])} and {_short(token)} both have id {i}"
            )
        owner[i] = token


def _as_lists(x: Any) -> Any:
    """Nested Python lists from NumPy arrays and framework tensors (torch and JAX have `tolist`, a TF
    tensor goes through NumPy); lists and tuples as they are."""
    if isinstance(x, list | tuple):
        return x
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return x


def _token_ids(ids: Any) -> list[int]:
    """`ids` as Python ints, or a `ValueError` naming the first one that is not a token id."""
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"token ids must be integers, got {_short(i)}")
        if not 0 <= i <= MAX_TOKEN_ID:
            raise ValueError(f"token id {_short(int(i))} is outside [0, 2**32), so it is no token id")
        out.append(int(i))
    return out


class OPTTokenizer:
    """Byte-level BPE tokenizer with OPT's conventions.

    Attributes:
        bos_token / eos_token / pad_token / unk_token: the special strings (OPT: `</s>`, `</s>`,
            `<pad>`, `</s>`) and their ids as `*_token_id`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = "</s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        unk_token: str = "</s>",
        add_bos_token: bool = True,
        padding_side: str = "right",
    ):
        check_vocab(vocab)
        for name, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if not isinstance(tok, str) or tok not in vocab:
                raise ValueError(f"{name} token {_short(tok)} is not in the vocabulary")
        for i, pair in enumerate(merges):
            missing = [t for t in pair if t not in vocab]
            if missing:  # the tokenizers library's own message for this is a multi-line Rust error
                raise ValueError(f"merge {i + 1} ({_short(' '.join(pair))}) uses {_short(missing[0])}, "
                                 "which is not in the vocabulary")
        try:
            self._tok = Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False))
        except Exception as e:  # the library raises a bare Exception for anything it cannot build
            raise ValueError(f"the vocabulary and merges do not form a BPE tokenizer ({_short(str(e))})") from None
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        specials: list[str] = [t for t in ("<s>", "<pad>", "</s>", "<unk>") if t in vocab]
        specials += [t for t in (bos_token, eos_token, pad_token, unk_token) if t not in specials]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        self.add_bos_token = add_bos_token
        self.padding_side = padding_side
        self.special_ids = {vocab[t] for t in specials}
        self.vocab_size = len(vocab)

    # ------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **overrides: Any) -> OPTTokenizer:
        """Load `vocab.json` + `merges.txt` (and `tokenizer_config.json` when present) from a folder.

        Raises:
            FileNotFoundError: a tokenizer file is missing (the message names it).
            ValueError: a file is malformed.
        """
        from opt_core.hub import is_hub_id, resolve_pretrained

        if is_hub_id(folder):  # a Hugging Face Hub id: its tokenizer files from the cache or the Hub
            folder = resolve_pretrained(folder, overrides.pop("revision", None), weights=False)
        folder = Path(folder)
        vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file {path} is missing (need {VOCAB_FILE} and {MERGES_FILE})")
        from opt_core.safe_files import read_json, read_text

        vocab = read_json(vocab_path, what="tokenizer file", expect=dict)
        merges = []
        for n, line in enumerate(read_text(merges_path, MAX_MERGES_BYTES, what="tokenizer file").splitlines()):
            if not line or line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{merges_path} line {n + 1} is not a merge pair (two tokens and one space)")
            merges.append((pair[0], pair[1]))
        kwargs: dict[str, Any] = {}
        cfg_path = folder / TOKENIZER_CONFIG
        if cfg_path.is_file():
            cfg = read_json(cfg_path, what="tokenizer config", expect=dict)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = cfg.get(key)
                if isinstance(value, dict):  # Hugging Face's AddedToken serialisation
                    value = value.get("content")
                if isinstance(value, str):
                    kwargs[key] = value
            if isinstance(cfg.get("add_bos_token"), bool):
                kwargs["add_bos_token"] = cfg["add_bos_token"]
            if cfg.get("padding_side") in ("left", "right"):
                kwargs["padding_side"] = cfg["padding_side"]
        try:
            return cls(vocab, merges, **{**kwargs, **overrides})
        except ValueError as e:  # name the files the problem came from
            raise ValueError(f"tokenizer in {folder}: {e}") from None

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write `vocab.json`, `merges.txt` and a Hugging Face-compatible `tokenizer_config.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = json.loads(self._tok.to_str())["model"]
        (folder / VOCAB_FILE).write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / MERGES_FILE).write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": self.add_bos_token,
            "add_prefix_space": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "errors": "replace",
            "model_max_length": 1000000000000000019884624838656,
            "padding_side": self.padding_side,
        }
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        specials = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------ encoding
    @overload
    def encode(self, text: str, add_special_tokens: bool = ..., return_tensors: None = ...) -> list[int]: ...
    @overload
    def encode(self, text: str, add_special_tokens: bool = ..., *, return_tensors: str) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> Any:
        """Token ids of one text, `</s>` first when `add_special_tokens` (and add_bos_token): a list,
        or with `return_tensors` ("np", "pt", "tf", "jax") an array [1, seq], as Hugging Face's."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if return_tensors is not None:
            return self(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors)["input_ids"]
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos_token else ids

    def __call__(
        self,
        texts: str | list[str],
        *,
        padding: bool | str = False,
        padding_side: str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "np",
    ) -> BatchEncoding:
        """Encode one text or a batch.

        Args:
            padding: True / "longest" pads to the longest row; "max_length" pads to `max_length`;
                False leaves rows ragged, which only works for a single text or equal lengths
                (unless `return_tensors=None`).
            padding_side: "left" (for generation) or "right"; default the tokenizer's.
            truncation: cut rows to `max_length` (from the right, keeping the prompt start).
            return_tensors: "np" (default: int64 NumPy arrays), "pt" (torch), "tf" (TensorFlow),
                "jax" (JAX), as Hugging Face's; None gives Python lists, as Hugging Face's default
                (a flat list for one str, ragged rows allowed without padding).
        Returns:
            A `BatchEncoding` (a dict; keys also read as attributes) of "input_ids" and
            "attention_mask", [batch, seq] ([1, seq] for one str), ready for `model(**enc)` and
            `model.generate(**enc)`.
        Raises:
            ValueError: bad padding/truncation arguments, rows of different lengths without padding,
                an unknown `return_tensors`.
            ImportError: `return_tensors` names a framework that is not installed.
        """
        if return_tensors is not None and return_tensors not in TENSOR_TYPES:
            raise ValueError(
                f"return_tensors={return_tensors!r} is unknown; expected one of {list(TENSOR_TYPES)} or None (lists)"
            )
        batch: list[str] = [texts] if isinstance(texts, str) else list(texts)
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        rows = [self.encode(t, add_special_tokens) for t in batch]
        if truncation:
            rows = [r[:max_length] for r in rows]
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max_length
        elif padding in (True, "longest"):
            width = max((len(r) for r in rows), default=0)
        elif padding is False or padding == "do_not_pad":
            lengths = {len(r) for r in rows}
            if return_tensors is None:  # lists may be ragged, as Hugging Face's
                masks = [[1] * len(r) for r in rows]
                if isinstance(texts, str):
                    return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
                return BatchEncoding(input_ids=rows, attention_mask=masks)
            if len(lengths) > 1:
                raise ValueError("rows have different lengths; pass padding=True to pad them")
            width = lengths.pop() if lengths else 0
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            if len(r) > width:
                raise ValueError(f"row {i} has {len(r)} tokens, more than max_length={width}")
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = r
            mask[i, sl] = 1
        if return_tensors is None:
            if isinstance(texts, str):  # one text: flat lists, as Hugging Face's
                return BatchEncoding(input_ids=ids[0].tolist(), attention_mask=mask[0].tolist())
            return BatchEncoding(input_ids=ids.tolist(), attention_mask=mask.tolist())
        return BatchEncoding(input_ids=ids, attention_mask=mask).convert_to_tensors(return_tensors)

    # ------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (NumPy, list or framework tensor with `.tolist()`)."""
        ids = _token_ids(_as_lists(ids))
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in _as_lists(batch)]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in _token_ids(ids)]

    def __len__(self) -> int:
        return self.vocab_size
