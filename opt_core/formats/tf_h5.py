"""Hugging Face TensorFlow checkpoints (`tf_model.h5`): the one place TF variable paths appear.

Hugging Face's `TFOPTForCausalLM.save_pretrained` writes a Keras-2 HDF5 weights file:

    /                          attrs: layer_names=["model"], backend="tensorflow", keras_version
    /model                     attrs: weight_names=["tfopt_for_causal_lm/model/decoder/...:0", ...]
    /model/tfopt_for_causal_lm/model/decoder/layers.0/self_attn/q_proj/kernel:0    [in, out]
    /model/tfopt_for_causal_lm/model/decoder/layers.0/self_attn_layer_norm/gamma:0 [hidden]
    /model/tfopt_for_causal_lm/model/decoder/embed_tokens/weight:0                 [vocab, embed]
    /model/tfopt_for_causal_lm/model/decoder/embed_positions/embeddings:0          [positions, hidden]
    /top_level_model_weights   attrs: weight_names=[] (float64, empty)

Keras 2 splits an attribute larger than 64512 bytes into `weight_names0`, `weight_names1`, ...
Hugging Face strips the first path component (the model-class scope) when loading, so only the
rest of the path has to match. The LM head is tied to `embed_tokens` and never stored.

Hugging Face's TF OPT ignores `enable_bias` (its fc1/fc2 always have a bias; attention always does)
and `layer_norm_elementwise_affine` (Keras LayerNormalization always has gamma and beta). As for
Flax (`opt_core.formats.flax_msgpack.identity_extras`), the writer stores zero biases and unit gammas
for configs without them, and the reader, given the config, accepts those tensors only when they
hold exactly those identity values, then drops them.

Hugging Face has no TF classes for OPT's classification and QA heads. For our own round trips we
extend the layout the way Keras 2 lays out every HF TF head: a top-level layer `score` (or
`qa_outputs`) with weights `tfopt_for_sequence_classification/score/kernel:0`.

Framework-free: h5py and NumPy only. Arrays come out and go in in canonical (torch) layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from opt_core.checkpoint import CheckpointError
from opt_core.config import OPTConfig
from opt_core.formats.flax_msgpack import identity_extras
from opt_core.layout import transpose
from opt_core.params import Head, ParamSpec, parameter_table

MAIN_LAYER = "model"  # Hugging Face's TFOPTMainLayer name: the top-level Keras layer
TOP_LEVEL_GROUP = "top_level_model_weights"
KERAS_VERSION = "2.21.0"  # what Hugging Face 4.57.6 with tf-keras 2.21 writes
HDF5_OBJECT_HEADER_LIMIT = 64512  # Keras 2 splits larger attributes into numbered chunks

# The model-class scope Hugging Face (Keras 2 snake_case of the class name) puts first.
ROOT_SCOPES = {
    Head.BASE: "tfopt_model",
    Head.CAUSAL_LM: "tfopt_for_causal_lm",
    Head.SEQUENCE_CLASSIFICATION: "tfopt_for_sequence_classification",
    Head.QUESTION_ANSWERING: "tfopt_for_question_answering",
}
HEAD_LAYERS = {"score", "qa_outputs"}  # top-level layers beside `model` (our extension, see above)

# Last path part of a canonical name -> the Keras variable name, per kind of module.
_LEAF_TO_TF = {"weight": "kernel:0", "bias": "bias:0"}
_NORM_LEAF_TO_TF = {"weight": "gamma:0", "bias": "beta:0"}
_SPECIAL_TO_TF = {
    "decoder.embed_tokens.weight": "decoder/embed_tokens/weight:0",
    "decoder.embed_positions.weight": "decoder/embed_positions/embeddings:0",
}
_SPECIAL_FROM_TF = {v: k for k, v in _SPECIAL_TO_TF.items()}
_LAYER_RE = re.compile(r"^layers\.\d+$")


# ---------------------------------------------------------------- names
def tf_name(name: str) -> str:
    """Canonical name -> TF variable path below the model-class scope.

    `decoder.layers.0.fc1.weight` -> `model/decoder/layers.0/fc1/kernel:0`,
    `score.weight` -> `score/kernel:0`. Inverse: `canonical_from_tf`.
    """
    if name in _SPECIAL_TO_TF:
        return f"{MAIN_LAYER}/{_SPECIAL_TO_TF[name]}"
    *modules, leaf = name.split(".")
    # `layers.0` stays one Keras scope (Hugging Face names the layer "layers.0").
    parts: list[str] = []
    i = 0
    while i < len(modules):
        if modules[i] == "layers" and i + 1 < len(modules) and modules[i + 1].isdigit():
            parts.append(f"layers.{modules[i + 1]}")
            i += 2
        else:
            parts.append(modules[i])
            i += 1
    table = _NORM_LEAF_TO_TF if parts and parts[-1].endswith("layer_norm") else _LEAF_TO_TF
    if leaf not in table:
        raise ValueError(f"no TF variable name for canonical parameter {name!r}")
    path = "/".join(parts + [table[leaf]])
    return path if parts[0] in HEAD_LAYERS else f"{MAIN_LAYER}/{path}"


def canonical_from_tf(path: str) -> str | None:
    """TF variable path below the model-class scope -> canonical name, or None if the path is
    not an OPT parameter (the caller reports it). Inverse of `tf_name`."""
    parts = path.split("/")
    if parts[0] == MAIN_LAYER:
        parts = parts[1:]
    elif parts[0] not in HEAD_LAYERS:
        return None
    rest = "/".join(parts)
    if rest in _SPECIAL_FROM_TF:
        return _SPECIAL_FROM_TF[rest]
    if len(parts) < 2:
        return None
    *modules, var = parts
    table = _NORM_LEAF_TO_TF if modules[-1].endswith("layer_norm") else _LEAF_TO_TF
    leaf = {v: k for k, v in table.items()}.get(var)
    if leaf is None:
        return None
    name = ".".join(modules + [leaf])
    try:
        round_trip = tf_name(name)
    except ValueError:
        return None
    return name if round_trip == path else None


def _is_kernel(path: str) -> bool:
    return path.endswith("/kernel:0")


# ---------------------------------------------------------------- reading
def _read_names(group, attr: str) -> list[str]:
    """A Keras-2 string-list attribute, joining the numbered chunks Keras writes for big lists."""

    def decode(values) -> list[str]:
        return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]

    if attr in group.attrs:
        return decode(group.attrs[attr])
    names: list[str] = []
    chunk = 0
    while f"{attr}{chunk}" in group.attrs:
        names += decode(group.attrs[f"{attr}{chunk}"])
        chunk += 1
    return names


def _entries(f, path: Path) -> Iterator[tuple[str, str]]:
    """(checkpoint key, HDF5 dataset path) for every weight the file lists.

    The key is the canonical name when the variable is an OPT parameter, else the full TF path so
    that key accounting reports it by its own name.
    """
    layer_names = _read_names(f, "layer_names")
    if not layer_names:
        raise CheckpointError(f"{path} is not a Keras-2 weights file (no 'layer_names' attribute)")
    for layer in layer_names:
        if layer not in f:
            raise CheckpointError(f"{path} lists layer {layer!r} but has no group for it")
        for weight in _read_names(f[layer], "weight_names"):
            if weight not in f[layer]:
                raise CheckpointError(f"{path}: layer {layer!r} lists {weight!r} but the dataset is missing")
            scope, _, below = weight.partition("/")
            name = canonical_from_tf(below) if below else None
            yield (name if name is not None else weight), f"{layer}/{weight}"


def _open(path: str | os.PathLike[str]):
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"cannot read {path} as HDF5: {e}") from None


def tf_h5_shapes(path: str | os.PathLike[str], config: OPTConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape in canonical (torch) layout for every weight of a `tf_model.h5`, without
    reading the data. Keys are canonical names; variables that are not OPT parameters keep their
    TF path (so `account_keys` lists them as unexpected). With `config`, the identity tensors
    Hugging Face TF stores for configs without biases or LayerNorm affine are left out (their
    values are checked by `read_tf_h5`)."""
    extras = identity_extras(config) if config is not None else {}
    shapes: dict[str, tuple[int, ...]] = {}
    with _open(path) as f:
        for key, ds_path in _entries(f, Path(path)):
            if key in extras:
                continue
            shape = tuple(int(d) for d in f[ds_path].shape)
            if _is_kernel(ds_path) and len(shape) == 2:
                shape = shape[::-1]
            if key in shapes:
                raise CheckpointError(f"{path} holds {key} twice")
            shapes[key] = shape
    return shapes


def read_tf_h5(
    path: str | os.PathLike[str], keys: set[str] | None = None, config: OPTConfig | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, NumPy array in canonical layout) one tensor at a time from a `tf_model.h5`.

    Args:
        path: the file.
        keys: only these keys (as `tf_h5_shapes` names them); default all.
        config: when given, identity extras (see the module docstring) are verified and skipped.
    Raises:
        CheckpointError: unreadable file, or an identity extra that is not all 0 / 1.
    """
    extras = identity_extras(config) if config is not None else {}
    with _open(path) as f:
        for key, ds_path in _entries(f, Path(path)):
            if key in extras:
                shape, value = extras[key]
                arr = np.asarray(f[ds_path])
                if arr.size != int(np.prod(shape)) or not np.all(arr == value):
                    raise CheckpointError(
                        f"{path}: {ds_path} must be all {value:g} (the config has enable_bias="
                        f"{config.enable_bias}, layer_norm_elementwise_affine="  # type: ignore[union-attr]
                        f"{config.layer_norm_elementwise_affine}), but it holds other values"  # type: ignore[union-attr]
                    )
                continue
            if keys is not None and key not in keys:
                continue
            arr = np.asarray(f[ds_path])
            if _is_kernel(ds_path) and arr.ndim == 2:
                arr = transpose(arr)
            yield key, arr


# ---------------------------------------------------------------- writing
def _write_names(group, attr: str, names: list[str]) -> None:
    """Write a string list the way Keras 2 does: variable-length strings, split into numbered
    chunks when the fixed-width array would exceed the HDF5 object-header limit."""
    import h5py

    dtype = h5py.string_dtype("ascii")
    encoded = [n.encode("utf8") for n in names]
    nbytes = np.asarray(encoded).nbytes if encoded else 0
    chunks = 1
    while nbytes / chunks > HDF5_OBJECT_HEADER_LIMIT:
        chunks += 1
    if chunks == 1:
        group.attrs.create(attr, np.asarray(encoded, dtype=object), dtype=dtype)
        return
    for i, part in enumerate(np.array_split(np.asarray(encoded, dtype=object), chunks)):
        group.attrs.create(f"{attr}{i}", part, dtype=dtype)


def _hf_order(config: OPTConfig, head: Head) -> list[str]:
    """Canonical names in the order Hugging Face's TF model creates its variables (which is the
    order its file lists them): embeddings, final LayerNorm, projections, then per layer k, q, v,
    out_proj, LayerNorm, fc1, fc2, LayerNorm; the tied LM head is not stored."""
    table = [s for s in parameter_table(config, head) if s.tied_to is None]
    rank = {"k_proj": 0, "q_proj": 1, "v_proj": 2, "out_proj": 3}

    def key(i_spec: tuple[int, ParamSpec]) -> tuple[int, int, int, int]:
        i, spec = i_spec
        name = spec.name
        if spec.layer is None:
            top = {"decoder.embed_tokens.weight": 0, "decoder.embed_positions.weight": 1}
            if name in top:
                return (0, top[name], 0, i)
            if name.startswith("decoder.final_layer_norm"):
                return (0, 2, 0, i)
            if name.startswith("decoder.project"):
                return (0, 3, 0, i)
            return (2, 0, 0, i)  # head parameters after the decoder
        return (1, spec.layer, rank.get(name.split(".")[-2], 4), i)

    return [s.name for _, s in sorted(enumerate(table), key=key)]


def write_tf_h5(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    config: OPTConfig,
    head: Head | str = Head.CAUSAL_LM,
) -> Path:
    """Write canonical-layout tensors as a Hugging Face `tf_model.h5` (Keras-2 weights file).

    Streams tensor by tensor (a `tensors` mapping that loads lazily keeps memory at one tensor),
    writing to a temporary name and renaming at the end. `TFOPTForCausalLM` / `TFOPTModel`
    (transformers 4.57.6) load the result. Configs without biases or LayerNorm affine parameters
    get the identity tensors Hugging Face TF always has (zero biases, unit gammas).

    Args:
        path: the file to write (usually `folder/tf_model.h5`).
        tensors: canonical name -> array in canonical (torch) layout; tied parameters may be absent.
        config: the model's config (decides which tensors must be present).
        head: the model kind.
    Raises:
        CheckpointError: a tensor is missing or has the wrong shape, or the config cannot be
            expressed in Hugging Face's TF layout (an untied LM head).
    """
    import h5py

    head = Head(head)
    if head is Head.CAUSAL_LM and not config.tie_word_embeddings:
        raise CheckpointError(
            "Hugging Face's TFOPTForCausalLM always ties lm_head to embed_tokens; a model with "
            "tie_word_embeddings=False cannot be written as tf_model.h5 (use safetensors)"
        )
    table = {s.name: s for s in parameter_table(config, head)}
    extras = identity_extras(config)
    full = config.replace(enable_bias=True, layer_norm_elementwise_affine=True)
    order = _hf_order(full, head)
    missing = [n for n in order if n not in tensors and n not in extras]
    if missing:
        raise CheckpointError(f"cannot write {path}: missing tensors {missing}")
    unknown = [n for n in tensors if n not in table]
    if unknown:
        raise CheckpointError(f"cannot write {path}: tensors not in the {head.value} table: {unknown}")

    scope = ROOT_SCOPES[head]
    by_layer: dict[str, list[str]] = {}
    for name in order:
        top = tf_name(name).split("/", 1)[0]
        by_layer.setdefault(top, []).append(name)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            _write_names(f, "layer_names", list(by_layer))
            f.attrs.create("backend", "tensorflow", dtype=h5py.string_dtype("ascii"))
            f.attrs.create("keras_version", KERAS_VERSION, dtype=h5py.string_dtype("ascii"))
            for layer in sorted(by_layer):  # Keras 2 creates the groups sorted by layer name
                group = f.create_group(layer)
                weight_names = [f"{scope}/{tf_name(n)}" for n in by_layer[layer]]
                _write_names(group, "weight_names", weight_names)
                for name, weight in zip(by_layer[layer], weight_names):
                    if name in extras:
                        shape, value = extras[name]
                        dtype = np.asarray(tensors[order[0]]).dtype
                        group.create_dataset(weight, data=np.full(shape, value, dtype=dtype))
                        continue
                    arr = np.asarray(tensors[name])
                    if tuple(arr.shape) != table[name].shape:
                        raise CheckpointError(
                            f"cannot write {path}: {name} has shape {list(arr.shape)}, the config "
                            f"implies {list(table[name].shape)}"
                        )
                    if weight.endswith("/kernel:0"):
                        arr = transpose(arr)
                    group.create_dataset(weight, data=arr)
            top = f.create_group(TOP_LEVEL_GROUP)
            top.attrs["weight_names"] = np.asarray([], dtype=np.float64)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
