"""`OPTConfig`: every field of a Hugging Face OPT `config.json`, validated, frozen.

The JSON names are Hugging Face's, with one exception made for Python: the file's
`_remove_final_layer_norm` is the attribute `remove_final_layer_norm`. Keys this class does not
model (`architectures`, `_name_or_path`, `transformers_version`, anything new) are kept in `extra`
and written back unchanged, so a load/save round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opt_core.activations import ACTIVATIONS
from opt_core.presets import ALIASES, PRESETS
from opt_core.safe_files import MAX_CONFIG_BYTES, read_json

CONFIG_NAME = "config.json"
# Suffixes of weight files: a path to one given where a model folder belongs gets its own message.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".pt", ".pth", ".ckpt")

# JSON key -> attribute name, where they differ.
_JSON_TO_ATTR = {"_remove_final_layer_norm": "remove_final_layer_norm"}
_ATTR_TO_JSON = {v: k for k, v in _JSON_TO_ATTR.items()}
# A normal init with std 10 already makes a layer's logits thousands wide; far beyond it float32
# products overflow. Real checkpoints use 0.02.
MAX_INIT_STD = 10.0
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# Upper limits on the sizes a config may declare. They sit far above every released OPT (175b: 96
# layers, hidden 12288, ffn 49152, vocab 50272, 2048 positions) and keep what a config implies
# (parameter table, buffers) computable before any file is compared with it: a 664-byte config.json
# must not make the library build a table of ten million layers. Each error names its limit.
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "ffn_dim": 1 << 18,
    "num_attention_heads": 1024,
    "max_position_embeddings": 1 << 20,
    "word_embed_proj_dim": 1 << 16,
    "num_labels": 1 << 16,
}
# The total the sizes imply (about 11 x 175b): the product of fields that are each within limits
# can still be absurd.
MAX_PARAMETERS = 2 * 10**12


def _short(value: Any) -> str:
    """A bounded repr for messages: a value read from a file may be a huge string or a deep list."""
    text = repr(value) if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class OPTConfig:
    """Hyper-parameters of an OPT model (defaults are opt-125m's, as in Hugging Face).

    Raises:
        ValueError: on construction, when a field is out of range or inconsistent with another.
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None  # None means hidden_size; resolved in __post_init__
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # present in real files, unused by OPT
    layerdrop: float = 0.0
    init_std: float = 0.02
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    use_cache: bool = True
    torch_dtype: str | None = None
    prefix: str | None = "</s>"
    num_labels: int = 2
    problem_type: str | None = None
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding and of `lm_head` (word_embed_proj_dim, resolved)."""
        assert self.word_embed_proj_dim is not None
        return self.word_embed_proj_dim

    @property
    def has_projections(self) -> bool:
        """True when `project_in`/`project_out` exist (token width != decoder width)."""
        return self.embed_dim != self.hidden_size

    @property
    def approx_parameters(self) -> int:
        """The decoder's parameter count to within biases and LayerNorms (an upper bound of the
        large terms: embeddings, projections, attention and MLP weights), computed without the
        parameter table."""
        d, e = self.hidden_size, self.embed_dim
        per_layer = 4 * d * d + 2 * d * self.ffn_dim + 9 * d + self.ffn_dim
        return self.vocab_size * e + (self.max_position_embeddings + 2) * d + 2 * d * e + 2 * d \
            + self.num_hidden_layers * per_layer

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "ffn_dim",
            "num_attention_heads",
            "max_position_embeddings",
            "word_embed_proj_dim",
            "num_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"OPTConfig.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ValueError(f"OPTConfig.{name} must be positive, got {value}")
            if value > SIZE_LIMITS[name]:
                raise ValueError(
                    f"OPTConfig.{name} = {value} is above this library's limit of {SIZE_LIMITS[name]} "
                    f"(opt_core.config.SIZE_LIMITS; the largest OPT, 175b, is far below it)"
                )
        if self.approx_parameters > MAX_PARAMETERS:
            raise ValueError(
                f"OPTConfig implies about {self.approx_parameters:.3g} parameters, above this library's limit of "
                f"{MAX_PARAMETERS:.0e} (opt_core.config.MAX_PARAMETERS)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"OPTConfig.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"OPTConfig.activation_function {_short(self.activation_function)} is unknown; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"OPTConfig.{name} must be a probability in [0, 1], got {_short(value)}")
        # NaN passes every comparison, and Infinity (which Python's json reads) draws infinite weights:
        # a fresh head then gives NaN logits. MAX_INIT_STD keeps drawn weights and their products finite.
        init_std = self.init_std
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not 0 <= init_std <= MAX_INIT_STD:
            raise ValueError(f"OPTConfig.init_std must be a number in [0, {MAX_INIT_STD:g}], got {_short(init_std)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"OPTConfig.{name} must be an integer or null, got {_short(value)}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"OPTConfig.{name} = {value} is outside the vocabulary [0, {self.vocab_size})"
                )
        for name in (
            "do_layer_norm_before",
            "remove_final_layer_norm",
            "enable_bias",
            "layer_norm_elementwise_affine",
            "use_cache",
            "tie_word_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OPTConfig.{name} must be true or false, got {_short(getattr(self, name))}")
        if self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(
                f"OPTConfig.problem_type {_short(self.problem_type)} is unknown; expected one of "
                f"{list(_PROBLEM_TYPES)}"
            )

    # ------------------------------------------------------------------ dict / JSON
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OPTConfig:
        """Build a config from a `config.json`-style dict; unknown keys go to `extra`.

        Raises:
            ValueError: when `model_type` is present and is not "opt", or a value is invalid.
        """
        if not isinstance(d, dict):
            raise ValueError(f"an OPT config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "opt")
        if model_type != "opt":
            raise ValueError(f"config has model_type {_short(model_type)}; this library reads 'opt' models")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        d = dict(d)
        if "dtype" in d:  # transformers 5 writes `dtype` where 4.x wrote `torch_dtype`; one field here
            dtype = d.pop("dtype")
            d["torch_dtype"] = dtype if dtype is not None else d.get("torch_dtype")
        for key, value in d.items():
            attr = _JSON_TO_ATTR.get(key, key)
            if attr in names:
                kwargs[attr] = value
            elif key == "extra" and isinstance(value, dict):
                extra.update(value)
            else:
                extra[key] = value
        # Hugging Face stores the label count implicitly, as the size of id2label.
        if "num_labels" not in kwargs and isinstance(extra.get("id2label"), dict):
            kwargs["num_labels"] = len(extra["id2label"])
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict: every modelled field under its Hugging Face name, then `extra`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "num_labels"):
                continue
            out[_ATTR_TO_JSON.get(f.name, f.name)] = getattr(self, f.name)
        extra = dict(self.extra)
        id2label = extra.get("id2label")
        if not (isinstance(id2label, dict) and len(id2label) == self.num_labels):
            if self.num_labels != 2 or "id2label" in extra:
                extra["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
                extra["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        out.update(extra)
        out["model_type"] = "opt"
        return out

    def replace(self, **changes: Any) -> OPTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> OPTConfig:
        """Read a `config.json` file (a regular file of at most `MAX_CONFIG_BYTES`, JSON within the
        depth limits of `opt_core.safe_files`).

        Raises:
            FileNotFoundError: no file. ValueError: a special file, too large, invalid UTF-8 or
                JSON, a missing required field, or a value out of range; the message names the file.
        """
        path = Path(path)
        try:
            data = read_json(path, what="config file", max_bytes=MAX_CONFIG_BYTES, expect=dict)
        except FileNotFoundError:
            raise FileNotFoundError(f"no OPT config at {path}") from None
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "ffn_dim")
        missing = [k for k in required if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"{path} is missing required OPT config fields: {', '.join(missing)}")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> OPTConfig:
        """Read a model folder's `config.json`, or a path to a `config.json` file itself.

        Raises:
            ValueError: `path` is a weights file (`model.safetensors`...), not the folder holding it.
        """
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        elif path.suffix in _WEIGHT_SUFFIXES:
            raise ValueError(f"{path} is a weights file; from_pretrained takes the model folder that holds it and "
                             f"config.json ({path.parent})")
        return cls.from_json_file(path)

    @classmethod
    def from_argument(cls, config: Any, folder: str | os.PathLike[str]) -> OPTConfig:
        """The `config=` argument of a backend's `from_pretrained`: None reads `folder`'s config.json;
        an OPTConfig is used as is; a dict (config.json's content) goes through `from_dict`; a path
        is read with `from_pretrained` (as Hugging Face accepts).

        Raises:
            TypeError: any other type, named. ValueError: a dict or file with a bad value.
        """
        if config is None:
            return cls.from_pretrained(folder)
        if isinstance(config, OPTConfig):
            return config
        if isinstance(config, dict):
            try:
                return cls.from_dict(config)
            except (ValueError, TypeError) as e:
                raise ValueError(f"config= (a dict): {e}") from None
        if isinstance(config, (str, os.PathLike)):
            return cls.from_pretrained(config)
        raise TypeError(f"config= must be an OPTConfig, a dict like config.json or a path, got {type(config).__name__}")

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write `folder/config.json` (created if needed); returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OPTConfig:
        """One of the nine released sizes ("opt-125m" .. "opt-175b"), with optional overrides."""
        if name not in ALIASES:
            raise ValueError(f"unknown OPT preset {name!r}; expected one of {list(PRESETS)}")
        p = PRESETS[ALIASES[name]]
        fields: dict[str, Any] = dict(
            hidden_size=p.d_model,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            ffn_dim=4 * p.d_model,
            do_layer_norm_before=p.do_layer_norm_before,
            word_embed_proj_dim=p.word_embed_proj_dim,
        )
        fields.update(overrides)
        return cls(**fields)


def _frozen_error(name: str, verb: str) -> dataclasses.FrozenInstanceError:
    if name in {f.name for f in dataclasses.fields(OPTConfig)}:
        return dataclasses.FrozenInstanceError(
            f"OPTConfig is frozen: cannot {verb} field {name!r}; make a changed copy with "
            f"config.replace({name}=...), or pass it to from_pretrained (from_pretrained(path, {name}=...))"
        )
    return dataclasses.FrozenInstanceError(
        f"OPTConfig is frozen and has no field {name!r}; keys it does not model live in `extra`: "
        f"config.replace(extra={{**config.extra, {name!r}: ...}})"
    )


def _refuse_setattr(self: OPTConfig, name: str, value: Any) -> None:
    raise _frozen_error(name, "set")


def _refuse_delattr(self: OPTConfig, name: str) -> None:
    raise _frozen_error(name, "delete")


# A frozen dataclass may not define __setattr__ in its body, so the generated one (a bare
# "cannot assign to field") is replaced here by one that says how to change a config.
OPTConfig.__setattr__ = _refuse_setattr  # type: ignore[method-assign,assignment]
OPTConfig.__delattr__ = _refuse_delattr  # type: ignore[method-assign,assignment]
