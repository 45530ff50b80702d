"""The one generation contract every backend's `generate` implements: the defaults file
(`generation_config.json`), the resolved options, ALL the checks on them, and the docstring.

    gen = GenerationConfig.from_pretrained(folder, model_config)   # generation_config.json (or the model config)
    opts = resolve_generation_options(model_config, gen, prompt_length=T, max_new_tokens=..., ...)
    opts.max_new_tokens, opts.eos_token_ids, opts.seed, ...        # every None filled in, every value checked

A backend's `generate` does nothing but: check the inputs (`opt_core.inputs.validate_inputs`),
call `resolve_generation_options` with its keyword arguments, and run the resolved options. So the
same call gets the same defaults, the same meaning and the same error in torch, TF and Flax.
docs/generation.md is this contract in prose; `GENERATE_DOC` is the docstring every model class's
`generate` carries.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.sampling import check_seed

GENERATION_CONFIG_NAME = "generation_config.json"

# Hugging Face 4.57's GenerationConfig defaults for the fields this contract honours, except
# max_new_tokens (see DEFAULT_MAX_NEW_TOKENS).
DEFAULT_MAX_NEW_TOKENS = 20  # HF's fallback is max_length=20 *including* the prompt; ours counts new tokens

# Limits that keep one `generate` call within memory and float32 arithmetic finite.
# Each beam is a full row of the KV cache: 10**6 beams of opt-125m ask for gigabytes before the first
# token, while beam search stops gaining long before 256 beams.
MAX_NUM_BEAMS = 256
# Logits are divided by the temperature and multiplied or divided by the repetition penalty in float32
# (largest finite value 3.4e38): with factors within [1e-6, 1e6] a logit up to 3e32 in magnitude stays
# finite, while temperature=1e-40 (a float32 subnormal) turns an ordinary logit of 10 into inf.
MIN_SCALE, MAX_SCALE = 1e-6, 1e6
# Beam scores are sum(log p) / length ** length_penalty: |length_penalty| <= 10 keeps 2048 ** 10 (1.3e33)
# and the scores it multiplies finite in float32.
MAX_ABS_LENGTH_PENALTY = 10.0


@dataclass
class GenerationConfig:
    """The defaults of `generate`, read from `generation_config.json` (Hugging Face's file).

    Fields left None in the file fall back to Hugging Face's defaults; the special-token ids fall
    back to the model's config.json. Keys this project does not honour are kept in `extra` (and
    written back by `save_pretrained`) but change nothing.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None  # HF's total-length limit, prompt included; used only without max_new_tokens
    min_new_tokens: int | None = None
    min_length: int | None = None  # HF's total minimum length, prompt included
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    num_return_sequences: int = 1
    penalty_alpha: float | None = None  # contrastive search when > 0 (with top_k > 1)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model_config(cls, config: OPTConfig) -> GenerationConfig:
        """What Hugging Face uses when a folder has no generation_config.json: the special tokens."""
        return cls(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id)

    @classmethod
    def from_dict(cls, d: dict[str, Any], config: OPTConfig | None = None) -> GenerationConfig:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names}
        gen = cls(**known, extra=extra)
        if config is not None:  # special tokens missing from the file: the model's
            for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
                if name not in d:
                    setattr(gen, name, getattr(config, name))
        return gen

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], config: OPTConfig | None = None) -> GenerationConfig:
        """Read `folder/generation_config.json` (or that file's path); without the file, the model
        config's special tokens (and `config` itself is read from the folder when not given)."""
        path = Path(folder)
        if path.is_dir():
            path = path / GENERATION_CONFIG_NAME
        if config is None and (path.parent / "config.json").is_file():
            config = OPTConfig.from_pretrained(path.parent)
        if not path.exists():  # a FIFO or folder exists, and is refused by read_json, not skipped
            if config is None:
                raise FileNotFoundError(f"{path} not found and no model config to take the special tokens from")
            return cls.from_model_config(config)
        from opt_core.safe_files import MAX_CONFIG_BYTES, read_json

        d = read_json(path, what="generation config", max_bytes=MAX_CONFIG_BYTES, expect=dict)
        gen = cls.from_dict(d, config)
        try:
            gen.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return gen

    def check(self) -> None:
        """Raise `ValueError` naming the first field whose type or range no `generate` call accepts
        (so a bad file is refused when it is read, naming the field, not mid-generation)."""
        for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        _int("num_beams", self.num_beams, 1, MAX_NUM_BEAMS,
             " (the limit MAX_NUM_BEAMS: every beam holds a full KV cache)")
        _int("num_return_sequences", self.num_return_sequences, 1, MAX_NUM_BEAMS,
             " (the limit MAX_NUM_BEAMS: every returned row holds a full KV cache)")
        if self.penalty_alpha is not None and not 0.0 <= _float("penalty_alpha", self.penalty_alpha) <= 1.0:
            raise ValueError(f"penalty_alpha must be in [0, 1] (0 turns contrastive search off), "
                             f"got {self.penalty_alpha}")
        _int("top_k", self.top_k, 0)
        _int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {_short(self.do_sample)}")
        _float("temperature", self.temperature, 0.0, MAX_SCALE, _FLOAT32_WHY)
        if self.do_sample:
            _float("temperature", self.temperature, MIN_SCALE, MAX_SCALE, _FLOAT32_WHY + " when sampling")
        if not 0.0 < _float("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _float("repetition_penalty", self.repetition_penalty, MIN_SCALE, MAX_SCALE, _FLOAT32_WHY)
        _float("length_penalty", self.length_penalty, -MAX_ABS_LENGTH_PENALTY, MAX_ABS_LENGTH_PENALTY,
               " (so float32 beam scores stay finite)")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or \"never\", got {_short(self.early_stopping)}")
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        if self.eos_token_id is not None:
            _eos_ids(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from Hugging Face's defaults, plus the special tokens and `extra`."""
        d: dict[str, Any] = dict(self.extra)
        default = GenerationConfig()
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name.endswith("_token_id") or value != getattr(default, f.name):
                d[f.name] = value
        return d

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write `folder/generation_config.json`; returns its path."""
        path = Path(folder) / GENERATION_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


@dataclass(frozen=True)
class GenerationOptions:
    """Every option of one `generate` call, resolved and checked (no None left but `seed` when
    decoding greedily). `eos_token_ids` is a tuple (empty: never stop at eos); `pad_token_id` is
    always an int (it fills rows that finished early; 0 when neither pad nor eos is known, since
    then no row finishes early); `streamer` is None or has `put` and `end`."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    repetition_penalty: float
    no_repeat_ngram_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    seed: int | None
    streamer: Any = None
    # Rows per prompt in the result: the best `num_return_sequences` beams, or as many samples.
    num_return_sequences: int = 1
    # Contrastive search when > 0 (Hugging Face's switch: penalty_alpha > 0 and top_k > 1, greedy).
    penalty_alpha: float = 0.0
    # The padding of a row that finished early, as Hugging Face writes it: greedy and sampling use
    # pad_token_id; beam search uses `pad_token_id or eos_token_id[0]` (so pad id 0 gives eos).
    beam_fill_id: int = 0


def _short(value: Any) -> str:
    """A bounded repr for error messages (a value from a file can be arbitrarily large)."""
    text = repr(value) if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _int(name: str, value: Any, least: int, most: int | None = None, limit: str = "") -> int:
    span = f">= {least}" if most is None else f"in [{least}, {most}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer {span}, got {_short(value)}")
    if value < least or (most is not None and value > most):
        raise ValueError(f"{name} must be an integer {span}{limit}, got {_short(int(value))}")
    return int(value)


def _float(name: str, value: Any, lo: float | None = None, hi: float | None = None, why: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {_short(value)}")
    try:
        value = float(value)
    except OverflowError:  # a Python int beyond float's range
        raise ValueError(f"{name} must be a finite number, got an integer of {int(value).bit_length()} bits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}]{why}, got {value:g}")
    return value


_FLOAT32_WHY = " (so float32 logits stay finite)"


def _eos_ids(value: Any) -> tuple[int, ...]:
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    out = []
    for e in items:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {_short(value)}")
        if e < 0:
            raise ValueError(
                f"eos_token_id {int(e)} is not a token id (ids are >= 0); pass eos_token_id=[] to "
                "generate without stopping at eos"
            )
        out.append(int(e))
    return tuple(dict.fromkeys(out))


class _CallableStreamer:
    """A plain callable used as a streamer: called like `put`; `end` does nothing."""

    def __init__(self, fn: Any) -> None:
        self.put = fn

    def end(self) -> None:
        pass


def resolve_generation_options(
    config: OPTConfig,
    generation_config: GenerationConfig | None,
    *,
    prompt_length: int,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    streamer: Any = None,
    early_stopping: bool | str | None = None,
    num_return_sequences: int | None = None,
    penalty_alpha: float | None = None,
) -> GenerationOptions:
    """Fill every None from `generation_config` (then Hugging Face's defaults) and check every value.

    Args:
        config: the model's config (max_position_embeddings, the fallback special tokens).
        generation_config: the model's generation defaults (None: those of `config`).
        prompt_length: tokens per prompt row (padding included), for the length checks and HF's
            prompt-inclusive `max_length` / `min_length`.
        the rest: `generate`'s keyword arguments, None meaning "the default" (see GENERATE_DOC).
    Returns:
        The `GenerationOptions`; `seed` is drawn from the operating system's randomness
        (`secrets.randbits(64)`) when sampling without one.
    Raises:
        ValueError: the first bad value, named, with what would be accepted.
    """
    gen = generation_config if generation_config is not None else GenerationConfig.from_model_config(config)
    prompt_length = _int("prompt length", prompt_length, 1)
    given = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "do_sample": do_sample,
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "num_beams": num_beams,
        "length_penalty": length_penalty, "repetition_penalty": repetition_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
    }

    def pick(value: Any, name: str) -> Any:
        return value if value is not None else getattr(gen, name)

    def label(name: str) -> str:
        """The option's name, and where its value came from when the call did not give it."""
        return name if given.get(name) is not None else f"{name} (from the generation config)"

    if max_new_tokens is None:
        if gen.max_new_tokens is not None:
            max_new_tokens = gen.max_new_tokens
        elif gen.max_length is not None:
            max_length = _int("max_length (from the generation config)", gen.max_length, 0)
            max_new_tokens = max(max_length - prompt_length, 0)
        else:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens = _int(label("max_new_tokens"), max_new_tokens, 0)
    total = prompt_length + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {prompt_length} tokens + {label('max_new_tokens')} {max_new_tokens} = {total} exceeds "
            f"max_position_embeddings ({config.max_position_embeddings}), the length limit; shorten the prompt or "
            "generate fewer tokens"
        )
    if min_new_tokens is None:
        if gen.min_new_tokens is not None:
            min_new_tokens = gen.min_new_tokens
        else:
            min_length = _int("min_length (from the generation config)", gen.min_length or 0, 0)
            min_new_tokens = max(min_length - prompt_length, 0)
    min_new_tokens = _int(label("min_new_tokens"), min_new_tokens, 0)

    do_sample = pick(do_sample, "do_sample")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"{label('do_sample')} must be True or False, got {_short(do_sample)}")
    do_sample = bool(do_sample)
    temperature = _float(label("temperature"), pick(temperature, "temperature"))
    if do_sample and not temperature > 0:
        raise ValueError(
            f"{label('temperature')} must be > 0 when sampling, got {temperature}; for greedy decoding pass "
            "do_sample=False"
        )
    if do_sample:  # greedy decoding never divides by the temperature
        _float(label("temperature"), temperature, MIN_SCALE, MAX_SCALE, _FLOAT32_WHY + " when sampling")
    top_k = pick(top_k, "top_k")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"{label('top_k')} must be an integer >= 0 (0 turns top-k filtering off), got {_short(top_k)}")
    top_k = int(top_k)
    top_p = _float(label("top_p"), pick(top_p, "top_p"))
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{label('top_p')} must be in (0, 1] (1 turns nucleus filtering off), got {top_p}")
    num_beams = _int(label("num_beams"), pick(num_beams, "num_beams"), 1, MAX_NUM_BEAMS,
                     " (the limit MAX_NUM_BEAMS: every beam holds a full KV cache)")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported; "
                         "pass do_sample=False for beam search or num_beams=1 to sample")
    length_penalty = _float(label("length_penalty"), pick(length_penalty, "length_penalty"),
                            -MAX_ABS_LENGTH_PENALTY, MAX_ABS_LENGTH_PENALTY, " (so float32 beam scores stay finite)")
    early_stopping = pick(early_stopping, "early_stopping")
    if isinstance(early_stopping, np.bool_):
        early_stopping = bool(early_stopping)
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"{label('early_stopping')} must be True, False or \"never\", got {_short(early_stopping)}")
    repetition_penalty = _float(label("repetition_penalty"), pick(repetition_penalty, "repetition_penalty"))
    if not repetition_penalty > 0:
        raise ValueError(f"{label('repetition_penalty')} must be > 0 (1 turns it off), got {repetition_penalty}")
    _float(label("repetition_penalty"), repetition_penalty, MIN_SCALE, MAX_SCALE, _FLOAT32_WHY)
    no_repeat_ngram_size = _int(label("no_repeat_ngram_size"), pick(no_repeat_ngram_size, "no_repeat_ngram_size"), 0)

    eos = pick(eos_token_id, "eos_token_id")
    eos_ids = _eos_ids(eos) if eos is not None else ()
    pad = pick(pad_token_id, "pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0  # HF pads with the first eos id when there is no pad token
    pad = _int(label("pad_token_id"), pad, 0)
    if pad >= config.vocab_size:  # it is written into the output and fed back as an input id
        raise ValueError(
            f"{label('pad_token_id')} {pad} is outside the vocabulary [0, {config.vocab_size}); "
            "pass a token id of the model"
        )

    num_return_sequences = _int(label("num_return_sequences"), pick(num_return_sequences, "num_return_sequences"), 1,
                                MAX_NUM_BEAMS, " (the limit MAX_NUM_BEAMS: every returned row holds a full KV cache)")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}): "
                         "beam search returns its best num_beams hypotheses at most")
    penalty_alpha = pick(penalty_alpha, "penalty_alpha")
    penalty_alpha = 0.0 if penalty_alpha is None else _float("penalty_alpha", penalty_alpha)
    if not 0.0 <= penalty_alpha <= 1.0:
        raise ValueError(f"penalty_alpha must be in [0, 1] (0 turns contrastive search off), got {penalty_alpha}")
    contrastive = penalty_alpha > 0 and top_k > 1 and not do_sample and num_beams == 1  # Hugging Face's switch
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError(f"num_return_sequences={num_return_sequences} needs beam search (num_beams >= "
                         "num_return_sequences) or sampling (do_sample=True): greedy decoding has one answer")
    if not contrastive:
        penalty_alpha = 0.0
    if contrastive and streamer is not None:
        raise ValueError("a streamer cannot be used with contrastive search (penalty_alpha > 0) in this project")

    if seed is not None:
        seed = check_seed(seed)
    elif do_sample:
        seed = secrets.randbits(64)  # fresh randomness, then the same counter stream as a given seed

    if streamer is not None and num_beams > 1:
        raise ValueError("a streamer cannot be used with beam search (num_beams > 1), as in Hugging Face")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        if not callable(streamer):
            raise ValueError(
                "streamer must have put(ids) and end() (Hugging Face's streamer interface), "
                f"got {type(streamer).__name__}"
            )
        streamer = _CallableStreamer(streamer)

    return GenerationOptions(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, eos_token_ids=eos_ids,
        pad_token_id=pad, seed=seed, streamer=streamer, num_return_sequences=num_return_sequences,
        penalty_alpha=penalty_alpha, beam_fill_id=(pad or eos_ids[0]) if eos_ids else pad,
    )


GENERATE_DOC = """Continue each row of `input_ids`; the same call, defaults, result and errors in every backend.

    generate(input_ids, attention_mask=None, *, max_new_tokens=None, min_new_tokens=None, do_sample=None,
             temperature=None, top_k=None, top_p=None, num_beams=None, length_penalty=None,
             repetition_penalty=None, no_repeat_ngram_size=None, eos_token_id=None, pad_token_id=None,
             seed=None, streamer=None, early_stopping=None, num_return_sequences=None, penalty_alpha=None)

Every keyword left None takes the model's `generation_config.json` value, else Hugging Face's default
(shown in brackets). Semantics are Hugging Face transformers 4.57's; deterministic modes (greedy,
beam search, penalties) give Hugging Face's tokens. See docs/generation.md.

Args:
    input_ids: [batch, prompt] token ids (any integer array; NumPy accepted); left-pad batches (a row
        ending in padding gets Hugging Face's right-padding warning).
    attention_mask: [batch, prompt] 0/1 (None: every token is real).
    max_new_tokens: [20] new tokens at most; 0 returns the prompt unchanged. (A file's `max_length`,
        which counts the prompt, is used when it sets no `max_new_tokens`.)
    min_new_tokens: [0] eos is forbidden until this many new tokens exist.
    do_sample: [False] sample instead of greedy / beam search.
    temperature: [1.0] divides the logits when sampling, within [1e-6, 1e6] (float32 stays finite).
    top_k: [50] keep the k most likely tokens when sampling (0: off; an integer >= 0).
    top_p: [1.0] keep the smallest set of most likely tokens with probability >= top_p, in (0, 1].
    num_beams: [1] beam search when > 1, at most 256 (not with do_sample): Hugging Face 4.57's
        algorithm, the prompt run once and its cache copied to every beam.
    length_penalty: [1.0] beam scores are sum(log p) / generated_length ** length_penalty; within [-10, 10].
    repetition_penalty: [1.0] within [1e-6, 1e6]; every id already in the row (prompt included) has its logit divided
        (if > 0) or multiplied (if < 0) by it.
    no_repeat_ngram_size: [0] when > 0, no n-gram of this size occurs twice in a row (prompt included).
    eos_token_id: [the model's] an id or a list of ids that end a row; [] never stops. Rows that end
        early are filled with pad_token_id; generation stops when every row has ended.
    pad_token_id: [the model's, else the first eos id] fills rows that ended; inside the vocabulary.
    seed: an integer in [0, 2**64): sampling draws from opt_core.sampling's counter-based stream, so
        the same seed gives the same tokens in torch, TF, Flax and NumPy. None: fresh randomness.
    streamer: an object with put(ids) and end() (Hugging Face's interface; a plain callable is
        called like put): put receives the prompt [batch, prompt] first, then each step's new
        tokens [batch], as NumPy int64 arrays; end() after the last. Not with beam or contrastive search.
    early_stopping: [False] beam search: True stops a row once it has num_beams finished hypotheses,
        False stops when the best running beam can no longer beat them, "never" when it cannot even
        at max length (Hugging Face's heuristics).
    num_return_sequences: [1] results per prompt: the best beams (<= num_beams) or that many samples;
        rows [b * n, (b + 1) * n) of the result belong to prompt b.
    penalty_alpha: [None] contrastive search (Su et al. 2022) when > 0 with top_k > 1 and no
        sampling: among the top_k tokens pick the one maximising (1 - penalty_alpha) * p(token)
        - penalty_alpha * (max cosine similarity of its hidden state to the row's earlier ones).

Returns:
    [batch * num_return_sequences, prompt + generated] int64 token ids, the prompt included
    (torch.int64 tensor, tf.int64 tensor, or for Flax a NumPy int64 array, since JAX holds no int64
    without x64). Fewer than
    max_new_tokens columns are generated when every row (or beam search) has finished. Rows that
    finished early are padded with pad_token_id; beam search pads as Hugging Face does, with
    `pad_token_id or eos_token_id[0]` (pad id 0 gives the first eos id).

Raises:
    ValueError: a bad input or option, named, with what would be accepted.
"""
