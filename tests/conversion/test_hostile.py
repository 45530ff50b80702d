"""Hostile checkpoints (as an attacker would hand a user one) are refused, with a message naming the
file and tensor, by all three `from_pretrained`, `opt convert` and `opt verify`; legacy torch files
load everywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest

from conversion import convert
from opt_cli.main import main
from opt_core.checkpoint import CheckpointError, save_numpy_safetensors
from opt_core.params import Head, hf_name
from tests.conversion.helpers import write_hf_checkpoint
from tests.variants import VARIANTS

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]
CONFIG = VARIANTS["pre_ln"]
BIAS = "model.decoder.layers.0.fc1.bias"
H5_BIAS = "model/tfopt_for_causal_lm/model/decoder/layers.0/fc1/bias:0"


def _base(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "base"
    stored = write_hf_checkpoint(folder, CONFIG)
    return folder, {hf_name(k, Head.CAUSAL_LM): v for k, v in stored.items()}


def _folder(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(tmp_path / "base" / "config.json", out / "config.json")
    return out


def _safetensors_with(tmp_path, name, tensors, **changes):
    folder = _folder(tmp_path, name)
    save_numpy_safetensors(folder, {**tensors, **changes})
    return folder


def _index_escape(tmp_path, tensors, target):
    folder = _folder(tmp_path, "index")
    outside = tmp_path / "outside.safetensors"
    save_numpy_safetensors(tmp_path / "elsewhere", tensors)
    shutil.move(tmp_path / "elsewhere" / "model.safetensors", outside)
    name = (
        "../outside.safetensors" if target == "relative" else (str(outside) if target == "absolute" else "/etc/passwd")
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in tensors}}))
    return folder


def _h5(tmp_path, how):
    import h5py

    folder = tmp_path / f"h5-{how}"
    convert(tmp_path / "base", folder, to="tf-h5", progress=False)
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        data = f[H5_BIAS][()]
        parent, leaf = H5_BIAS.rsplit("/", 1)
        del f[H5_BIAS]
        outside = tmp_path / f"outside-{how}"
        if how == "external-storage":
            outside.write_bytes(data.tobytes())
            f[parent].create_dataset(
                leaf, shape=data.shape, dtype=data.dtype, external=[(str(outside), 0, data.nbytes)]
            )
        elif how == "external-link":
            with h5py.File(str(outside) + ".h5", "w") as o:
                o["data"] = data
            f[parent][leaf] = h5py.ExternalLink(str(outside) + ".h5", "/data")
        else:
            f[parent + "/real"] = data
            f[parent][leaf] = h5py.SoftLink(f"/{parent}/real")
    return folder


def _ext(shape, dtype, raw):
    return msgpack.ExtType(1, msgpack.packb([list(shape), dtype, raw], use_bin_type=True))


def _msgpack(tmp_path, how):
    folder = _folder(tmp_path, f"msgpack-{how}")
    if how == "deep":
        raw = b"\x91" * 3000 + b"\xc0"
    elif how == "dtype":
        raw = msgpack.packb(
            {"model": {"decoder": {"embed_tokens": {"embedding": _ext((2, 2), "complex512", b"\0" * 8)}}}},
            use_bin_type=True,
        )
    else:
        raw = msgpack.packb(
            {
                "model": {
                    "decoder": {
                        "embed_tokens": {
                            "embedding": {"__msgpack_chunked_array__": True, "shape": {"0": 4}, "chunks": {"0": 5}}
                        }
                    }
                }
            },
            use_bin_type=True,
        )
    (folder / "flax_model.msgpack").write_bytes(raw)
    return folder


def _fifo(tmp_path):
    folder = _folder(tmp_path, "fifo")
    os.mkfifo(folder / "model.safetensors")
    return folder


def _link_out(tmp_path):
    """model.safetensors a link to a valid file outside the folder."""
    folder = _folder(tmp_path, "link-out")
    (folder / "model.safetensors").symlink_to(tmp_path / "base" / "model.safetensors")
    return folder


def _stride0_bin(tmp_path):
    from tests.hostile.fixtures import stride0_bin

    folder = tmp_path / "stride0"
    stride0_bin(folder, CONFIG)
    return folder


def _unwritten_h5(tmp_path):
    from tests.hostile.fixtures import unwritten_h5

    folder = tmp_path / "unwritten"
    unwritten_h5(folder, CONFIG)
    return folder


def _metadata_list(tmp_path):
    import struct

    folder = _folder(tmp_path, "metadata")
    raw = (tmp_path / "base" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = ["not", "an", "object"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return folder


CASES = {
    # case -> (builder(tmp_path, tensors), what the message must say)
    "index ../outside": (lambda t, s: _index_escape(t, s, "relative"), "must be plain file names"),
    "index absolute path": (lambda t, s: _index_escape(t, s, "absolute"), "must be plain file names"),
    "index /etc/passwd": (lambda t, s: _index_escape(t, s, "passwd"), "must be plain file names"),
    "h5 external storage": (lambda t, s: _h5(t, "external-storage"), "stored in external files"),
    "h5 external link": (lambda t, s: _h5(t, "external-link"), "is an external link"),
    "h5 soft link": (lambda t, s: _h5(t, "soft-link"), "is a soft link"),
    "int32 weight": (
        lambda t, s: _safetensors_with(t, "i32", s, **{BIAS: s[BIAS].astype(np.int32)}),
        rf"{BIAS} \(int32",
    ),
    "uint8 weight": (
        lambda t, s: _safetensors_with(t, "u8", s, **{BIAS: s[BIAS].astype(np.uint8)}),
        rf"{BIAS} \(uint8",
    ),
    "bool weight": (lambda t, s: _safetensors_with(t, "bool", s, **{BIAS: s[BIAS] > 0}), rf"{BIAS} \(bool"),
    "NaN weight": (
        lambda t, s: _safetensors_with(t, "nan", s, **{BIAS: np.where(s[BIAS] > 0, np.nan, 0).astype(np.float32)}),
        rf"{BIAS} holds nan",
    ),
    "inf weight": (
        lambda t, s: _safetensors_with(t, "inf", s, **{BIAS: np.full_like(s[BIAS], np.inf)}),
        rf"{BIAS} holds inf",
    ),
    "untied head, tied config": (
        lambda t, s: _safetensors_with(t, "head", s, **{"lm_head.weight": s["model.decoder.embed_tokens.weight"] + 1}),
        "lm_head.weight .*differs from",
    ),
    "msgpack 3000 deep": (lambda t, s: _msgpack(t, "deep"), "nesting deeper than"),
    "msgpack bogus dtype": (lambda t, s: _msgpack(t, "dtype"), "has dtype 'complex512'"),
    "msgpack malformed chunks": (lambda t, s: _msgpack(t, "chunks"), "malformed chunked array"),
    "FIFO as weights": (lambda t, s: _fifo(t), "is a FIFO"),
    "weights linked from outside": (lambda t, s: _link_out(t), "is a link to .*, outside the model folder"),
    "stride-0 .bin views": (lambda t, s: _stride0_bin(t), "view whose elements overlap"),
    "h5 never written": (lambda t, s: _unwritten_h5(t), "but never written"),
    "__metadata__ not an object": (lambda t, s: _metadata_list(t), "__metadata__ must be an object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_everywhere(case, tmp_path, capsys):
    import opt_flax
    import opt_tf
    import opt_torch

    _, tensors = _base(tmp_path)
    build, message = CASES[case]
    folder = build(tmp_path, tensors)
    for backend in (opt_torch, opt_tf, opt_flax):
        with pytest.raises(CheckpointError, match=message):
            backend.OPTForCausalLM.from_pretrained(folder)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "safetensors", "--no-progress"]) != 0
    assert re.search(message, capsys.readouterr().err), case
    assert not (tmp_path / "out").exists()
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[[5, 6, 7]]")
    rc = main(["verify", str(folder), "--backends", "torch", "--prompts", str(prompts), "--new-tokens", "1"])
    out = capsys.readouterr()
    assert rc != 0 and re.search(message, out.out + out.err), (case, out.out + out.err)


def test_non_finite_weights_load_on_request(tmp_path):
    import opt_torch

    _, tensors = _base(tmp_path)
    folder = CASES["NaN weight"][0](tmp_path, tensors)
    model = opt_torch.OPTForCausalLM.from_pretrained(folder, allow_non_finite=True)
    assert model.model.decoder.layers[0].fc1.bias.isnan().any()
    convert(folder, tmp_path / "out", to="bin", allow_non_finite=True, progress=False)


def test_metaseq_cfg_disagreeing_with_config_json_is_named(tmp_path):
    import torch

    folder = tmp_path / "ms"
    folder.mkdir()
    _, tensors = _base(tmp_path)
    from opt_core.layout import fuse_qkv

    sd = {}
    for k, v in tensors.items():
        name = k.removeprefix("model.")
        if ".q_proj." in name:
            sd[name.replace("q_proj", "qkv_proj")] = torch.from_numpy(
                fuse_qkv(v, tensors[k.replace("q_proj", "k_proj")], tensors[k.replace("q_proj", "v_proj")])
            )
        elif ".k_proj." not in name and ".v_proj." not in name:
            sd[name] = torch.from_numpy(v)
    cfg = {
        "model": {
            "decoder_attention_heads": CONFIG.num_attention_heads,
            "decoder_normalize_before": True,
            "decoder_embed_dim": CONFIG.hidden_size,
        }
    }
    torch.save({"model": sd, "cfg": cfg}, folder / "consolidated.pt")
    json.dump(
        dict(CONFIG.to_dict(), num_attention_heads=2 * CONFIG.num_attention_heads), open(folder / "config.json", "w")
    )
    with pytest.raises(CheckpointError, match="num_attention_heads: 4 vs 8"):
        convert(folder, tmp_path / "out", to="safetensors", progress=False)


def test_legacy_torch_files_load_everywhere(tmp_path):
    import torch

    import opt_flax
    import opt_tf
    import opt_torch

    _, tensors = _base(tmp_path)
    folder = _folder(tmp_path, "legacy")
    torch.save(
        {k: torch.from_numpy(v) for k, v in tensors.items()},
        folder / "pytorch_model.bin",
        _use_new_zipfile_serialization=False,
    )
    want = tensors["model.decoder.layers.1.fc2.weight"]
    got = opt_torch.OPTForCausalLM.from_pretrained(folder).model.decoder.layers[1].fc2.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    assert opt_tf.OPTForCausalLM.from_pretrained(folder).loading_info.ok
    assert opt_flax.OPTForCausalLM.from_pretrained(folder).loading_info.ok
    report = convert(folder, tmp_path / "out", to="safetensors", verify=True, progress=False)
    assert report.verify.ok and report.src_format == "bin"
