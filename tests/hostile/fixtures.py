"""Hostile files, written by code: each builder makes a small folder that once made the library
allocate without bound, hang, or leave the folder. Every file stays under a few hundred kilobytes."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np

from opt_core import OPTConfig
from opt_core.params import Head, hf_name, parameter_table
from tests.conversion.helpers import write_hf_checkpoint
from tests.variants import VARIANTS

TINY = VARIANTS["pre_ln"]
# A config whose float32 weights take about 420 MB: more than the memory a refused file may cost,
# far less than any limit of the library, so only the file's own checks can refuse it.
BIG = OPTConfig(vocab_size=50272, hidden_size=1024, num_hidden_layers=4, ffn_dim=4096, num_attention_heads=16,
                max_position_embeddings=2048)


def tiny_model(folder: Path) -> Path:
    """A valid tiny safetensors model folder (config.json + model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_hf_checkpoint(folder, TINY)
    return folder


def write_config(folder: Path, config: OPTConfig | dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    d = config.to_dict() if isinstance(config, OPTConfig) else config
    path = folder / "config.json"
    path.write_text(json.dumps(d, indent=2))
    return path


def stored_specs(config: OPTConfig) -> list:
    return [s for s in parameter_table(config, Head.CAUSAL_LM) if s.tied_to is None]


# ---------------------------------------------------------------- torch pickles
def stride0_bin(folder: Path, config: OPTConfig = BIG, overlap: bool = False) -> Path:
    """`pytorch_model.bin` whose every tensor is a stride-0 view of a one-element storage (or,
    with `overlap`, a view whose strides overlap over a storage smaller than the tensor)."""
    import torch

    write_config(folder, config)
    tensors = {}
    for spec in stored_specs(config):
        if overlap:
            n = max(spec.shape)
            base = torch.zeros(2 * n)
            view = torch.as_strided(base, spec.shape, (1,) * len(spec.shape))
        else:
            view = torch.zeros(1).expand(*spec.shape)
        tensors[hf_name(spec.name, Head.CAUSAL_LM)] = view
    torch.save(tensors, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def _torch_zip(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save-style zip archive holding `pickle_bytes` as its data.pkl (no storages)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
    return path


def shared_tuple_pickle(depth: int = 30) -> bytes:
    """A pickle whose persistent id is a tuple of depth `depth` in which every level holds the one
    below twice, through the memo: a few hundred bytes whose `str()` has 2**depth leaves."""
    out = [b"\x80\x02", b")", b"q\x00"]  # PROTO 2, EMPTY_TUPLE, BINPUT 0
    for _ in range(depth):
        out.append(b"h\x00h\x00\x86q\x00")  # BINGET 0, BINGET 0, TUPLE2, BINPUT 0
    out.append(b"Q.")  # BINPERSID (calls persistent_load with it), STOP
    return b"".join(out)


def far_memo_bin(folder: Path) -> Path:
    """A pickle that stores into memo slot 2**30 (LONG_BINPUT): the C unpickler grows its memo
    array to that index, 8 GB, for a 10-byte pickle."""
    tiny_model(folder)
    (folder / "model.safetensors").unlink()
    return _torch_zip(folder / "pytorch_model.bin", b"\x80\x02)r" + struct.pack("<I", 2**30) + b".")


def nested_tuple_bin(folder: Path) -> Path:
    """Within the nesting limit (30 levels), but `str()` of it has 2**30 leaves."""
    tiny_model(folder)
    (folder / "model.safetensors").unlink()
    return _torch_zip(folder / "pytorch_model.bin", shared_tuple_pickle())


def shared_key_bin(folder: Path, depth: int = 40) -> Path:
    """A dict whose key is a shared tuple `depth` levels deep: hashing it (which unpickling a dict
    does) visits 2**depth leaves."""
    tiny_model(folder)
    (folder / "model.safetensors").unlink()
    out = [b"\x80\x02", b"}", b")q\x000"]  # PROTO 2, EMPTY_DICT, EMPTY_TUPLE, BINPUT 0, POP
    for _ in range(depth):
        out.append(b"h\x00h\x00\x86q\x000")  # BINGET 0 twice, TUPLE2, BINPUT 0, POP
    out.append(b"h\x00K\x01s.")  # the key, value 1, SETITEM, STOP
    return _torch_zip(folder / "pytorch_model.bin", b"".join(out))


def truncated_bin(folder: Path) -> Path:
    """A real `pytorch_model.bin` cut in half (a download stopped early)."""
    import torch

    tiny_model(folder)
    (folder / "model.safetensors").unlink()
    from opt_core.reference import random_parameters

    params = random_parameters(TINY, "causal_lm", seed=0)
    path = folder / "pytorch_model.bin"
    torch.save({hf_name(s.name, Head.CAUSAL_LM): torch.from_numpy(params[s.name]) for s in stored_specs(TINY)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


# ---------------------------------------------------------------- HDF5
def unwritten_h5(folder: Path, config: OPTConfig = BIG, written: int = 0, compressed: bool = False) -> Path:
    """A Keras-2 `tf_model.h5` laid out for `config` whose datasets are declared but never
    written, except the first `written` (which hold real bytes); with `compressed`, every dataset
    holds zeros through gzip instead (a few bytes each)."""
    import h5py

    from opt_core.formats.tf_h5 import MAIN_LAYER, ROOT_SCOPES, tf_name

    write_config(folder, config)
    path = folder / "tf_model.h5"
    scope = ROOT_SCOPES[Head.CAUSAL_LM]
    names = []
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [MAIN_LAYER.encode()]
        for i, spec in enumerate(stored_specs(config)):
            weight = f"{scope}/{tf_name(spec.name)}"
            shape = spec.shape[::-1] if weight.endswith("/kernel:0") and len(spec.shape) == 2 else spec.shape
            if compressed:
                f.create_dataset(f"{MAIN_LAYER}/{weight}", data=np.zeros(shape, np.float32), compression="gzip")
            elif i < written:
                f.create_dataset(f"{MAIN_LAYER}/{weight}", data=np.ones(shape, np.float32))
            else:
                f.create_dataset(f"{MAIN_LAYER}/{weight}", shape=shape, dtype=np.float32)
            names.append(weight.encode())
        f[MAIN_LAYER].attrs["weight_names"] = names
    return path


# ---------------------------------------------------------------- JSON
def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def safetensors_with_header(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def metaseq_with_cfg(folder: Path, model_cfg: dict) -> Path:
    """A one-part metaseq checkpoint (`consolidated.pt`) of the tiny model with `model_cfg`."""
    import torch

    from opt_core.layout import fuse_qkv
    from opt_core.reference import random_parameters

    folder.mkdir(parents=True, exist_ok=True)
    params = random_parameters(TINY, "causal_lm", seed=0)
    sd = {}
    for spec in stored_specs(TINY):
        name = spec.name
        if ".q_proj." in name:
            fused = fuse_qkv(params[name], params[name.replace("q_proj", "k_proj")],
                             params[name.replace("q_proj", "v_proj")])
            sd[name.replace("q_proj", "qkv_proj")] = torch.from_numpy(fused)
        elif ".k_proj." not in name and ".v_proj." not in name:
            sd[name] = torch.from_numpy(params[name])
    path = folder / "consolidated.pt"
    torch.save({"model": sd, "cfg": {"model": model_cfg}}, path)
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
