"""`from_pretrained(path, **config_overrides)`: Hugging Face's way of changing a config at load time
(`OPTForSequenceClassification.from_pretrained(path, num_labels=3)`), one helper for all three
backends.

Every keyword a backend's loader does not take itself must name an `OPTConfig` field (under its
attribute or its config.json name) or be `id2label` / `label2id`; the new values are checked as
config.json values are (`OPTConfig` validates on construction). As in Hugging Face, `num_labels`
and `id2label` stay consistent: a new `num_labels` replaces a label map of another size with
`LABEL_0..`, an `id2label` sets `num_labels`, and the two together must agree.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opt_core.config import _JSON_TO_ATTR, OPTConfig

LABEL_MAPS = ("id2label", "label2id")


def override_names() -> list[str]:
    """Every keyword `apply_config_overrides` accepts: the config.json names of the fields, and the label maps."""
    attr_to_json = {v: k for k, v in _JSON_TO_ATTR.items()}
    fields = [attr_to_json.get(f.name, f.name) for f in dataclasses.fields(OPTConfig) if f.name != "extra"]
    return sorted({*fields, *(_JSON_TO_ATTR[j] for j in _JSON_TO_ATTR), *LABEL_MAPS} - {"torch_dtype"})


def loader_options(loader: Callable[..., Any]) -> list[str]:
    """The keyword options a backend's loader takes itself (for the unknown-keyword message), read
    from its signature so the message stays right as options are added."""
    params = list(inspect.signature(loader).parameters.values())[2:]  # after model class and path
    return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _id2label(value: Any) -> dict[str, str]:
    """config.json's form of an id -> label map ({"0": "neg", ...}); keys must be 0..n-1."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"id2label must be a non-empty dict of label id -> label name, got {value!r}")
    out: dict[int, str] = {}
    for key, label in value.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"id2label key {key!r} is not a label id (an integer)") from None
        if isinstance(key, bool) or not isinstance(label, str):
            raise ValueError(f"id2label must map integer ids to label names; got {key!r}: {label!r}")
        out[i] = label
    if sorted(out) != list(range(len(out))):
        raise ValueError(f"id2label ids must be 0..{len(out) - 1}, got {sorted(out)}")
    return {str(i): out[i] for i in range(len(out))}


def _label2id(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ValueError(f"label2id must be a dict of label name -> integer id, got {value!r}")
    return dict(value)


def apply_config_overrides(
    config: OPTConfig,
    overrides: Mapping[str, Any],
    *,
    loader: str = "from_pretrained",
    options: Iterable[str] = (),
) -> OPTConfig:
    """`config` with `overrides` applied, as Hugging Face's `from_pretrained(path, **kwargs)` does.

    Args:
        config: the folder's config (or the one passed as `config=`).
        overrides: the keywords the loader did not take itself: `OPTConfig` fields by attribute or
            config.json name (`num_labels`, `dropout`, `attention_dropout`, `pad_token_id`, ...),
            `id2label`, `label2id`.
        loader: the calling function's name, for the error messages.
        options: the loader's own keyword names, listed when a keyword is unknown.
    Returns:
        A new, validated `OPTConfig` (`config` itself when there is nothing to apply).
    Raises:
        TypeError: a keyword that is neither a config field nor a label map (all such named), or
            `torch_dtype` outside torch (torch's older spelling of `dtype`).
        ValueError: a value a config.json could not hold (`OPTConfig`'s own checks), a malformed
            label map, `num_labels` and `id2label` of different sizes.
    """
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(OPTConfig)} - {"extra"}
    changes: dict[str, Any] = {}
    labels: dict[str, Any] = {}
    unknown = []
    for key, value in overrides.items():
        attr = _JSON_TO_ATTR.get(key, key)
        if attr == "torch_dtype":
            raise TypeError(
                f"{loader}() got torch_dtype=: that is the torch backend's older spelling of dtype=; pass dtype= here"
            )
        if key in LABEL_MAPS:
            labels[key] = value
        elif attr in fields:
            changes[attr] = value
        else:
            unknown.append(key)
    if unknown:
        names = sorted(set(options))
        own = f" ({', '.join(names)})" if names else ""
        raise TypeError(
            f"{loader}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: neither an option of "
            f"this backend{own} nor an OPTConfig field to override ({', '.join(override_names())})"
        )
    extra = dict(config.extra)
    num_labels = changes.get("num_labels", config.num_labels)
    if "id2label" in labels:
        id2label = _id2label(labels["id2label"])
        if "num_labels" in changes and changes["num_labels"] != len(id2label):
            raise ValueError(
                f"num_labels={changes['num_labels']!r} and id2label (with {len(id2label)} labels) disagree; "
                "pass one of them"
            )
        changes["num_labels"] = num_labels = len(id2label)
        extra["id2label"] = id2label
        inverse = {label: int(i) for i, label in id2label.items()}
        if "label2id" in labels and _label2id(labels["label2id"]) != inverse:
            raise ValueError(f"label2id {labels['label2id']!r} is not the inverse of id2label {labels['id2label']!r}")
        extra["label2id"] = inverse
    elif "num_labels" in changes:
        old = extra.get("id2label")
        # Hugging Face's num_labels setter: a label map of another size becomes LABEL_0..LABEL_{n-1}.
        if isinstance(num_labels, int) and not (isinstance(old, Mapping) and len(old) == num_labels):
            extra["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            extra["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    if "label2id" in labels and "id2label" not in labels:
        label2id = _label2id(labels["label2id"])
        bad = {k: v for k, v in label2id.items() if not 0 <= v < num_labels}
        if bad:
            raise ValueError(f"label2id ids must be in [0, {num_labels}) (num_labels={num_labels}), got {bad}")
        extra["label2id"] = label2id
    return config.replace(**changes, extra=extra)


__all__ = ["LABEL_MAPS", "apply_config_overrides", "loader_options", "override_names"]
