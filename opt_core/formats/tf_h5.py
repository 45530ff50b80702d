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

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opt_core.config import OPTConfig
from opt_core.formats._transpose import Scratch, fast_transpose, kernel_layout
from opt_core.formats.base import (
    CheckpointError,
    LazyTensors,
    Reader,
    Writer,
    check_regular_file,
    final_permissions,
    out_array,
)
from opt_core.formats.files import TF_H5
from opt_core.formats.flax_msgpack import identity_extras
from opt_core.params import Head, ParamSpec, parameter_table
from opt_core.safe_files import bounded_repr

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


def _stored_dtype(dtype: np.dtype) -> np.dtype:
    """h5py has no bfloat16: it stores ml_dtypes/TF bfloat16 as 2-byte opaque (`|V2`); read it back
    as bfloat16, the only 2-byte opaque float Keras writes."""
    if dtype.kind == "V" and dtype.itemsize == 2:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return dtype


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


def _hard_object(f, ds_path: str, path: Path):
    """The object at `ds_path`, reached through hard links only: soft and external links (which
    could point at another file's bytes) are refused, as is anything that is not a group or dataset."""
    import h5py

    node = f
    parts = [p for p in ds_path.split("/") if p]
    for i, part in enumerate(parts):
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
        where = "/".join(parts[: i + 1])
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise CheckpointError(f"{path}: {where} is {kind}; weights must be stored in the file itself")
        node = node[part]
    return node


def _check_dataset(ds, ds_path: str, path: Path) -> None:
    """Refuse datasets whose bytes live elsewhere (HDF5 external storage, virtual datasets) or
    that are not plain numeric arrays."""
    import h5py

    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{path}: {ds_path} is not a dataset")
    if ds.external:
        raise CheckpointError(
            f"{path}: {ds_path} is stored in external files ({', '.join(str(e[0]) for e in ds.external)}); "
            "weights must be stored in the file itself"
        )
    if ds.is_virtual:
        raise CheckpointError(f"{path}: {ds_path} is a virtual dataset; weights must be stored in the file itself")
    if ds.dtype.kind not in "fiubV" or ds.dtype.fields is not None:
        raise CheckpointError(f"{path}: {ds_path} has dtype {ds.dtype}, not a numeric array")


MAX_COMPRESSION = 16  # float weights compress by 1.1-1.5x; more is a file of zeros posing as weights


def _check_written(ds, ds_path: str, shape: tuple[int, ...], path: Path) -> None:
    """Refuse a dataset whose bytes are not in the file: declared but never (or partly) written,
    which HDF5 reads back as its fill value (a 79 KB file of such datasets became 1.23 GB of zeros),
    or compressed beyond what weights compress to.

    Raises:
        CheckpointError: naming the dataset, its logical size and the bytes stored for it.
    """
    logical = math.prod(shape) * ds.dtype.itemsize
    stored = int(ds.id.get_storage_size())
    if logical == 0:
        return
    if stored == 0:
        raise CheckpointError(
            f"{path}: {ds_path} is declared ({list(shape)}, {logical:,} bytes) but never written; weights must "
            "be stored in the file"
        )
    compressed = bool(ds.compression) or (ds.chunks is not None and ds.id.get_create_plist().get_nfilters() > 0)
    if not compressed and stored < logical:
        raise CheckpointError(
            f"{path}: {ds_path} is {list(shape)} ({logical:,} bytes) but only {stored:,} bytes of it were written"
        )
    if compressed and stored * MAX_COMPRESSION < logical:
        raise CheckpointError(
            f"{path}: {ds_path} is {list(shape)} ({logical:,} bytes) stored in {stored:,} compressed bytes, more "
            f"than {MAX_COMPRESSION}x compression; weights do not compress like that"
        )


def _entries(f, path: Path) -> Iterator[tuple[str, str]]:
    """(checkpoint key, HDF5 dataset path) for every weight the file lists.

    The key is the canonical name when the variable is an OPT parameter, else the full TF path so
    that key accounting reports it by its own name.
    """
    layer_names = _read_names(f, "layer_names")
    if not layer_names:
        raise CheckpointError(f"{path} is not a Keras-2 weights file (no 'layer_names' attribute)")
    for layer in layer_names:
        if _hard_object(f, layer, path) is None:
            raise CheckpointError(f"{path} lists layer {bounded_repr(layer, 120)} but has no group for it")
        for weight in _read_names(f[layer], "weight_names"):
            ds = _hard_object(f, f"{layer}/{weight}", path)
            if ds is None:
                raise CheckpointError(
                    f"{path}: layer {bounded_repr(layer, 120)} lists {bounded_repr(weight, 200)} but the dataset is "
                    "missing"
                )
            _check_dataset(ds, f"{layer}/{weight}", path)
            scope, _, below = weight.partition("/")
            name = canonical_from_tf(below) if below else None
            yield (name if name is not None else weight), f"{layer}/{weight}"


@dataclass(frozen=True)
class _Dataset:
    path: str  # inside the file
    shape: tuple[int, ...]  # as stored
    stored: np.dtype  # as h5py reports it (bfloat16 is `|V2`)
    kernel: bool  # a Keras [in, out] kernel, transposed on read


class TFH5Reader(Reader):
    """A `tf_model.h5` opened once, read one tensor at a time in canonical (torch) layout.

    The file is opened and its weight list walked once, in the constructor; `read` then costs one
    dataset read (plus a transpose for Keras [in, out] kernels). Use as a context manager or call
    `close()`.

    Args:
        path: the `.h5` file.
        config: when given, the identity tensors Hugging Face TF stores for configs without biases
            or LayerNorm affine parameters are hidden from `shapes`/`read`;
            `check_identity_extras` verifies their values.
    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: not a readable Keras-2 weights file, or a key stored twice.
    """

    fmt = "tf-h5"

    def __init__(self, path: str | os.PathLike[str], config: OPTConfig | None = None, *,
                 files: list[Path] | None = None, weight_map: object = None):
        import h5py

        path = Path(path)
        file = files[0] if files else path / TF_H5 if path.is_dir() else path
        super().__init__(path, [file])
        self.path = check_regular_file(file)
        self.layout_config = config
        self._h5 = None
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path} as HDF5: {e}") from None
        self._extras = identity_extras(config) if config is not None else {}
        self._checked = False
        # Key -> its dataset, in file order. Paths, not h5py Dataset objects: every open dataset
        # keeps HDF5 metadata in memory (measured: 7 MB more peak RSS over opt-1.3b's 390).
        self._datasets: dict[str, _Dataset] = {}
        try:
            for key, ds_path in _entries(self._h5, self.path):
                if key in self._datasets:
                    raise CheckpointError(f"{self.path} holds {key} twice")
                ds = self._h5[ds_path]
                shape = tuple(int(d) for d in ds.shape)
                _check_written(ds, ds_path, shape, self.path)
                kernel = _is_kernel(ds_path) and len(shape) == 2
                self._datasets[key] = _Dataset(ds_path, shape, np.dtype(ds.dtype), kernel)
        except BaseException:
            self.close()
            raise
        self._scratch = Scratch()

    def close(self) -> None:
        """Close the file; safe to call twice."""
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            h5.close()
            self._h5 = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape in canonical layout, in file order, without reading data. Keys are
        canonical names; variables that are not OPT parameters keep their TF path (so
        `account_keys` lists them as unexpected)."""
        return {
            key: (ds.shape[::-1] if ds.kernel else ds.shape)
            for key, ds in self._datasets.items()
            if key not in self._extras
        }

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype of `key` (bfloat16 for h5py's 2-byte opaque type)."""
        return _stored_dtype(self._dataset(key).stored)

    def _dataset(self, key: str) -> _Dataset:
        if self._h5 is None:
            raise ValueError(f"{self.path} is closed")
        if key not in self._datasets or key in self._extras:
            raise KeyError(f"{self.path} holds no {key}")
        return self._datasets[key]

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `key` in canonical layout and its stored dtype.

        `out` is filled and returned when it is C-contiguous with the tensor's canonical shape and
        dtype; otherwise a new array is returned. Raises KeyError for an unknown key.
        """
        if not self._checked:
            self._checked = True
            self.check_identity_extras()
        return self._read(self._dataset(key), out)

    def _read(self, ds: _Dataset, out: np.ndarray | None) -> np.ndarray:
        dtype = _stored_dtype(ds.stored)
        out = out_array(out, ds.shape[::-1] if ds.kernel else ds.shape, dtype)
        raw = self._scratch.array(ds.shape, ds.stored) if ds.kernel else out.view(ds.stored)
        if raw.size:
            self._h5[ds.path].read_direct(raw)  # type: ignore[index]
        if ds.kernel:
            fast_transpose(raw.view(dtype), out=out)  # Keras kernel [in, out] -> canonical [out, in]
        return out

    def check_identity_extras(self) -> None:
        """Verify that every identity extra (see the module docstring) holds exactly 0 (biases) or
        1 (LayerNorm gammas). No-op without a config.

        Raises:
            CheckpointError: an extra of the wrong size or with other values.
        """
        for key, (shape, value) in self._extras.items():
            if key not in self._datasets:
                continue  # absent extras are not ours to require (key accounting reports them)
            ds = self._datasets[key]
            arr = self._read(ds, None)
            if arr.size != int(np.prod(shape)) or not np.all(arr == value):
                raise CheckpointError(
                    f"{self.path}: {ds.path} must be all {value:g} (the config has enable_bias="
                    f"{self.layout_config.enable_bias}, layer_norm_elementwise_affine="  # type: ignore[union-attr]
                    f"{self.layout_config.layer_norm_elementwise_affine}), but it holds other values"  # type: ignore[union-attr]
                )


def tf_h5_shapes(path: str | os.PathLike[str], config: OPTConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape in canonical (torch) layout for every weight of a `tf_model.h5`, without
    reading the data (`TFH5Reader.shapes`). Keys are canonical names; variables that are not OPT
    parameters keep their TF path (so `account_keys` lists them as unexpected). With `config`, the
    identity tensors Hugging Face TF stores for configs without biases or LayerNorm affine are left
    out (their values are checked by `read_tf_h5`)."""
    with TFH5Reader(path, config) as reader:
        return reader.shapes()


def read_tf_h5(
    path: str | os.PathLike[str], keys: set[str] | None = None, config: OPTConfig | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, NumPy array in canonical layout) one tensor at a time from a `tf_model.h5`, in
    file order (a `TFH5Reader` opened once).

    Args:
        path: the file.
        keys: only these keys (as `tf_h5_shapes` names them); default all.
        config: when given, identity extras (see the module docstring) are verified and skipped.
    Raises:
        CheckpointError: unreadable file, or an identity extra that is not all 0 / 1.
    """
    with TFH5Reader(path, config) as reader:
        reader.check_identity_extras()
        for key in reader.shapes():
            if keys is None or key in keys:
                yield key, reader.read(key)


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

    Streams tensor by tensor (a `tensors` mapping that loads lazily keeps memory at one tensor plus
    one reused [in, out] kernel buffer; each tensor is fetched once), writing to a temporary name
    and renaming at the end. A Linear weight whose memory is already [in, out] (Fortran order) is
    written without a copy. `TFOPTForCausalLM` / `TFOPTModel`
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
    scratch = Scratch()  # one buffer for every transposed kernel
    extras_dtype: np.dtype | None = None  # the identity extras take the first tensor's dtype
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
                        if extras_dtype is None:  # only if no tensor came first (the embedding does)
                            extras_dtype = np.asarray(tensors[order[0]]).dtype
                        group.create_dataset(weight, data=np.full(shape, value, dtype=extras_dtype))
                        continue
                    arr = np.asarray(tensors[name])
                    if tuple(arr.shape) != table[name].shape:
                        raise CheckpointError(
                            f"cannot write {path}: {name} has shape {list(arr.shape)}, the config "
                            f"implies {list(table[name].shape)}"
                        )
                    if extras_dtype is None:
                        extras_dtype = arr.dtype
                    if weight.endswith("/kernel:0"):
                        arr = kernel_layout(arr, scratch)  # canonical [out, in] -> Keras [in, out]
                    group.create_dataset(weight, data=arr)
                    del arr
            top = f.create_group(TOP_LEVEL_GROUP)
            top.attrs["weight_names"] = np.asarray([], dtype=np.float64)
        final_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class TFH5Writer(Writer):
    """Writes `tf_model.h5` in Hugging Face's Keras-2 layout (through `write_tf_h5`). Memory: one
    tensor and one reused transposed kernel buffer. Hugging Face's TF OPT never stores the tied LM head."""

    fmt = "tf-h5"
    stores_tied_lm_head = False

    def write_all(self, fetch: Callable[[str], np.ndarray]) -> None:
        def checked(name: str) -> np.ndarray:
            arr = fetch(name)
            self._check(name, arr)
            return arr

        write_tf_h5(self.folder / TF_H5, LazyTensors((p.spec.name for p in self.plan), checked), self.config,
                    self.head)

    @classmethod
    def check_model(cls, config: OPTConfig, head: Head) -> None:
        if head is Head.CAUSAL_LM and not config.tie_word_embeddings:
            raise ValueError(
                "Hugging Face's TFOPTForCausalLM always ties lm_head to embed_tokens; a model with "
                "tie_word_embeddings=false cannot be written as tf_model.h5 (use safetensors, bin or flax-msgpack)"
            )

    def commit(self) -> list[Path]:
        self._require_complete()
        return [self.folder / TF_H5]  # write_tf_h5 already renamed its temporary file
