"""metaseq (and fairseq) OPT checkpoints: read only.

Layout on disk: one file per model-parallel part, `reshard-model_part-{i}.pt` (or a single
`consolidated.pt`), each a pickle `{"model": state_dict, "cfg": {...}}`, read like `.bin` files by
the restricted unpickler of `opt_core.formats.torch_bin` (no code runs, no torch needed). Per part,
attention q/k/v are fused into `self_attn.qkv_proj` in **K, V, Q** order; across parts (Megatron
tensor parallelism) the token embedding, qkv and fc1 are split on dim 0, out_proj/fc2 weights on
dim 1, and LayerNorms, positions, out_proj/fc2 biases are replicated. Old files (350m) say
`project_in_dim`, `project_out_dim` and `decoder.layer_norm`. `decoder.version` is bookkeeping and
`decoder.output_projection.weight` is the tied embedding again; both are dropped (the latter after
checking that it equals the embedding).

This module is the one place metaseq names appear. A merged tensor is read from the parts' files
on request, one at a time, each part's rows straight into the caller's buffer where they are
contiguous there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.formats._transpose import Scratch
from opt_core.formats.base import CheckpointError, Reader, open_file, out_array, same_bits
from opt_core.formats.files import metaseq_parts
from opt_core.formats.torch_bin import TensorRef, check_views, load_pickle, read_tensor
from opt_core.safe_files import bounded_repr

# metaseq name -> canonical name (whole-key renames of the old 350m files).
RENAMES = {
    "decoder.project_in_dim.weight": "decoder.project_in.weight",
    "decoder.project_out_dim.weight": "decoder.project_out.weight",
    "decoder.layer_norm.weight": "decoder.final_layer_norm.weight",
    "decoder.layer_norm.bias": "decoder.final_layer_norm.bias",
}
DROPPED = ("decoder.version", "version")
TIED_OUTPUT = "decoder.output_projection.weight"
_QKV = re.compile(r"^(decoder\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)$")

# How a canonical tensor is split across model-parallel parts: the axis, or None when replicated.
_SPLIT_DIM0 = re.compile(r"(embed_tokens\.weight|\.fc1\.(weight|bias)|\.(q|k|v)_proj\.(weight|bias))$")
_SPLIT_DIM1 = re.compile(r"\.(out_proj|fc2)\.weight$")


def split_axis(name: str) -> int | None:
    """The axis metaseq splits canonical tensor `name` along across model-parallel parts (None: replicated)."""
    if _SPLIT_DIM0.search(name):
        return 0
    if _SPLIT_DIM1.search(name):
        return 1
    return None


def is_metaseq(path: Path) -> bool:
    """Whether `path` looks like a metaseq checkpoint (a .pt file or a folder of part files)."""
    if path.is_file():
        return path.suffix == ".pt"
    try:
        metaseq_parts(path)
        return True
    except (FileNotFoundError, CheckpointError):
        return False


def _qkv_rows(t: TensorRef, j: int) -> TensorRef:
    """Rows of q (j=0), k (1) or v (2) inside a K,V,Q-fused tensor, as a tensor of its own."""
    n = t.shape[0] // 3
    block = (2, 0, 1)[j]  # fused order K, V, Q
    step = t.stride[0] if t.shape else 1
    return TensorRef(t.storage, t.storage_offset + block * n * step, (n, *t.shape[1:]), t.stride)


# The cfg fields read, and the Python type each must have (fairseq writes them from argparse).
_CFG_TYPES: dict[str, tuple[type, ...]] = {
    "decoder_attention_heads": (int,), "decoder_embed_dim": (int,), "decoder_layers": (int,),
    "decoder_ffn_embed_dim": (int,), "decoder_learned_pos": (bool,), "decoder_normalize_before": (bool,),
    "activation_fn": (str,), "dropout": (int, float), "attention_dropout": (int, float),
}


def _typed_cfg(model: dict[str, Any], src: str) -> dict[str, Any]:
    """`model` with every field this reader uses checked for type (None counts as absent).

    Raises:
        CheckpointError: naming the field, the type it needs and (bounded) the value it has.
    """
    for key, types in _CFG_TYPES.items():
        value = model.get(key)
        if value is None:
            continue
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok:
            want = ("a number" if float in types else "true/false" if bool in types
                    else "an integer" if int in types else "a string")
            raise CheckpointError(f"{src}: field {key} must be {want}, got {bounded_repr(value, 80)}")
    return model


def config_from_metaseq(cfg: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]],
                        source: str = "the checkpoint") -> OPTConfig:
    """An OPTConfig from a metaseq/fairseq `cfg` and the (merged, canonical) tensor shapes.

    Sizes come from the tensors; the head count and the LayerNorm placement from `cfg`.

    Raises:
        CheckpointError: `cfg` lacks what the tensors cannot tell, has a field of the wrong type,
            or disagrees with the tensors.
    """
    src = f"the cfg of {source}"
    nested = isinstance(cfg, dict) and isinstance(cfg.get("model"), dict)
    model = dict(cfg["model"]) if nested else dict(cfg or {})  # type: ignore[index]
    model = _typed_cfg(model, src)
    if "decoder.embed_tokens.weight" not in shapes or "decoder.embed_positions.weight" not in shapes:
        raise CheckpointError("metaseq checkpoint lacks decoder.embed_tokens.weight or decoder.embed_positions.weight")
    if len(shapes["decoder.embed_tokens.weight"]) != 2 or len(shapes["decoder.embed_positions.weight"]) != 2:
        raise CheckpointError(f"{source}: decoder.embed_tokens.weight and decoder.embed_positions.weight must be 2-D")
    vocab, embed = shapes["decoder.embed_tokens.weight"]
    positions, hidden = shapes["decoder.embed_positions.weight"]
    layers = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.layers\.(\d+)\.", k))})
    ffn = shapes.get("decoder.layers.0.fc1.weight", (None,))[0]
    heads = model.get("decoder_attention_heads")
    if heads is None:
        raise CheckpointError(
            "the metaseq checkpoint has no cfg with decoder_attention_heads, and the head count cannot be "
            "read from tensor shapes; pass a config (--config config.json)"
        )
    checks = {"decoder_embed_dim": hidden, "decoder_layers": len(layers), "decoder_ffn_embed_dim": ffn}
    wrong = [f"{k}={model[k]} but the tensors say {v}" for k, v in checks.items()
             if model.get(k) is not None and v is not None and int(model[k]) != int(v)]
    if model.get("decoder_learned_pos") is False:
        wrong.append("decoder_learned_pos=False (sinusoidal positions), but OPT learns its positions")
    if wrong:
        raise CheckpointError(f"{src} disagrees with the tensors: {'; '.join(wrong)}")
    pre_ln = bool(model.get("decoder_normalize_before", "decoder.final_layer_norm.weight" in shapes
                            or "decoder.final_layer_norm.bias" in shapes))
    has_final = any(k.startswith("decoder.final_layer_norm.") for k in shapes)
    has_layer_ln = any(".self_attn_layer_norm." in k for k in shapes)
    try:
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=len(layers),
            ffn_dim=ffn if ffn is not None else 4 * hidden,
            num_attention_heads=int(heads),
            max_position_embeddings=positions - 2,
            do_layer_norm_before=pre_ln,
            remove_final_layer_norm=pre_ln and not has_final,
            word_embed_proj_dim=embed,
            enable_bias="decoder.layers.0.fc1.bias" in shapes,
            layer_norm_elementwise_affine=has_layer_ln or has_final,
            activation_function=model.get("activation_fn") or "relu",
            dropout=float(model["dropout"]) if model.get("dropout") is not None else 0.1,
            attention_dropout=float(model.get("attention_dropout") or 0.0),
            torch_dtype=None,
            extra={"architectures": ["OPTForCausalLM"]},
        )
    except ValueError as e:
        raise CheckpointError(f"{src} and tensor shapes make no valid OPT config: {e}") from None



class MetaseqReader(Reader):
    """A metaseq checkpoint: one or several model-parallel part files, merged on the fly."""

    fmt = "metaseq"

    def __init__(self, path: str | os.PathLike[str], config: Any = None, *, files: list[Path] | None = None,
                 weight_map: Any = None):
        path = Path(path)
        files = files if files is not None else metaseq_parts(path)
        super().__init__(path, files)
        self._parts: list[dict[str, TensorRef]] = []
        cfgs = []
        for f in files:
            obj, _ = load_pickle(f)
            model = obj.get("model") if isinstance(obj, dict) else None
            if not isinstance(model, dict) or not all(isinstance(v, TensorRef) for v in model.values()):
                raise CheckpointError(f"{f} is not a metaseq checkpoint: expected a dict with a 'model' state dict")
            check_views(model, f)
            self._parts.append(model)
            cfgs.append(obj.get("cfg"))
        self.cfg = cfgs[0] if isinstance(cfgs[0], dict) else None
        self.n_parts = len(files)
        # canonical name -> ("qkv", fused key, index in (q, k, v)) or ("plain", key)
        self._recipe: dict[str, tuple] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        keys0 = list(self._parts[0])
        for i, part in enumerate(self._parts[1:], start=1):
            if set(part) != set(keys0):
                only0 = sorted(set(keys0) - set(part))
                onlyi = sorted(set(part) - set(keys0))
                raise CheckpointError(
                    f"model-parallel parts {files[0].name} and {files[i].name} hold different keys: "
                    f"only in the first {only0}, only in the second {onlyi}"
                )
        self._has_tied_output = TIED_OUTPUT in keys0
        for key in keys0:
            if key in DROPPED or key == TIED_OUTPUT:
                continue
            m = _QKV.match(key)
            if m:
                for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    name = f"{m.group(1)}{proj}.{m.group(2)}"
                    self._recipe[name] = ("qkv", key, j)
                    self._shapes[name] = self._merged_shape(name, key, qkv=True)
            else:
                name = RENAMES.get(key, key)
                self._recipe[name] = ("plain", key)
                self._shapes[name] = self._merged_shape(name, key, qkv=False)
        self.config = (config_from_metaseq(self.cfg, self._shapes, str(files[0]) if len(files) == 1 else str(path))
                       if self.cfg is not None else None)
        self._handles: dict[Path, Any] = {}
        self._scratch = Scratch()  # one reused buffer for parts that are compared or copied, not kept

    def _merged_shape(self, name: str, key: str, qkv: bool) -> tuple[int, ...]:
        shapes = [tuple(p[key].shape) for p in self._parts]
        shape = list(shapes[0])
        if qkv:
            if not shape or shape[0] % 3:
                raise CheckpointError(f"{key} has shape {shapes[0]}, dim 0 not divisible by 3 (fused K, V, Q)")
            shape[0] //= 3
        axis = split_axis(name)
        if any(s != shapes[0] for s in shapes):
            raise CheckpointError(f"{key} has different shapes across model-parallel parts: {shapes}")
        if axis is not None and self.n_parts > 1:
            if axis >= len(shape):
                raise CheckpointError(f"{key} has shape {shapes[0]}, cannot merge parts along axis {axis}")
            shape[axis] *= self.n_parts
        return tuple(shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self, key: str) -> np.dtype:
        return self._parts[0][self._recipe[key][1]].dtype

    def source_key(self, name: str) -> str:
        """The metaseq key a canonical name is read from."""
        return self._recipe[name][1]

    def where(self, key: str) -> str:
        return str(self.files[0]) if self.n_parts == 1 else f"{self.source} ({self.n_parts} parts)"

    def _read_part(self, i: int, t: TensorRef, key: str, out: np.ndarray | None = None) -> np.ndarray:
        path = self.files[i]
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open_file(path)
        return read_tensor(f, path, key, t, out)

    def _part_tensor(self, i: int, recipe: tuple) -> TensorRef:
        t = self._parts[i][recipe[1]]
        return _qkv_rows(t, recipe[2]) if recipe[0] == "qkv" else t

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        recipe = self._recipe[key]
        shape, dtype = self._shapes[key], self.dtype(key)
        out = out_array(out, shape, dtype)
        axis = split_axis(key)
        if axis is None or self.n_parts == 1:
            self._read_part(0, self._part_tensor(0, recipe), recipe[1], out)
            for i in range(1, self.n_parts):
                t = self._part_tensor(i, recipe)
                if not same_bits(out, self._read_part(i, t, recipe[1], self._scratch.array(t.shape, t.dtype))):
                    raise CheckpointError(
                        f"{recipe[1]} should be replicated across model-parallel parts but part {i} differs from part 0"
                    )
        else:
            rows = shape[axis] // self.n_parts
            for i in range(self.n_parts):
                t = self._part_tensor(i, recipe)
                if axis == 0:  # this part's rows are contiguous in `out`: read them in place
                    self._read_part(i, t, recipe[1], out[i * rows : (i + 1) * rows])
                else:
                    out[:, i * rows : (i + 1) * rows] = self._read_part(i, t, recipe[1],
                                                                        self._scratch.array(t.shape, t.dtype))
        if key == "decoder.embed_tokens.weight" and self._has_tied_output:
            rows = shape[0] // self.n_parts
            for i in range(self.n_parts):
                t = self._parts[i][TIED_OUTPUT]
                tied = self._read_part(i, t, TIED_OUTPUT, self._scratch.array(t.shape, t.dtype))
                if not same_bits(tied, out[i * rows : (i + 1) * rows]):
                    raise CheckpointError(
                        f"{TIED_OUTPUT} differs from decoder.embed_tokens.weight: this converter handles OPT's "
                        "tied output projection only"
                    )
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}
