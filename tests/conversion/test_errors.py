"""Bad input stops the conversion with a message naming the problem, and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conversion import convert
from opt_cli.main import main
from opt_core.checkpoint import CheckpointError, save_numpy_safetensors
from tests.conversion.helpers import read_canonical, snapshot, write_hf_checkpoint
from tests.variants import VARIANTS

pytestmark = pytest.mark.torch


def _nothing_written(dst):
    assert not dst.exists(), f"{dst} was created"
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


@pytest.fixture
def src(tmp_path):
    write_hf_checkpoint(tmp_path / "src", VARIANTS["pre_ln"])
    return tmp_path / "src"


def test_truncated_safetensors(src, tmp_path):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*100 bytes missing"):
        convert(src, tmp_path / "out", to="bin", progress=False)
    _nothing_written(tmp_path / "out")


def test_truncated_header(src, tmp_path):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        convert(src, tmp_path / "out", to="bin", progress=False)
    _nothing_written(tmp_path / "out")


def test_wrong_shape_in_a_sharded_checkpoint(tmp_path):
    config = VARIANTS["pre_ln"]
    weights = write_hf_checkpoint(tmp_path / "src", config, shard_bytes=20_000)
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.decoder.layers.1.fc1.weight"]
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "src" / shard)
    tensors["model.decoder.layers.1.fc1.weight"] = np.zeros((65, 32), np.float32)  # config implies [64, 32]
    save_numpy_safetensors(tmp_path / "src", tensors, base_name=shard)
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.decoder\.layers\.1\.fc1\.weight is \[65, 32\], "
                                              r"the config implies \[64, 32\]"):
        convert(tmp_path / "src", tmp_path / "out", to="safetensors", progress=False)
    _nothing_written(tmp_path / "out")
    assert weights  # the fixture wrote real weights


def test_index_naming_the_wrong_shard(tmp_path):
    write_hf_checkpoint(tmp_path / "src", VARIANTS["pre_ln"], shard_bytes=20_000)
    path = tmp_path / "src" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = "model.decoder.embed_tokens.weight"
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    index["weight_map"]["model.decoder.layers.0.fc9.weight"] = shards[0]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "src", tmp_path / "out", to="safetensors", progress=False)
    assert "model.decoder.embed_tokens.weight" in str(e.value) and "fc9" in str(e.value)
    _nothing_written(tmp_path / "out")


def test_config_disagreeing_with_the_tensors(src, tmp_path):
    d = json.loads((src / "config.json").read_text())
    d["hidden_size"] = 64
    d["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "out", to="tf-h5", progress=False)
    msg = str(e.value)
    assert "missing tensors" in msg and "decoder.layers.2.fc1.weight" in msg
    assert "wrong shape: model.decoder.embed_positions.weight is [66, 32], the config implies [66, 64]" in msg
    _nothing_written(tmp_path / "out")


def test_typo_and_extra_hf_keys_are_named(tmp_path):
    config = VARIANTS["pre_ln"]
    weights = write_hf_checkpoint(tmp_path / "src", config)
    tensors = {f"model.{k}": v for k, v in weights.items()}
    a = "model.decoder.layers.0.self_attn"
    tensors[f"{a}.qkj_proj.weight"] = tensors.pop(f"{a}.q_proj.weight")
    tensors["model.decoder.layers.1.extra.weight"] = np.zeros(3, np.float32)
    save_numpy_safetensors(tmp_path / "src", tensors)
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "src", tmp_path / "out", to="flax-msgpack", progress=False)
    msg = str(e.value)
    assert ("unknown tensors (2): model.decoder.layers.0.self_attn.qkj_proj.weight, "
            "model.decoder.layers.1.extra.weight") in msg
    assert "missing tensors (1): decoder.layers.0.self_attn.q_proj.weight" in msg
    _nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(src, dst, to="safetensors", progress=False)
    assert snapshot(dst) == {"keep.txt": b"mine"}
    with pytest.raises(FileExistsError, match=r"does not write \(keep.txt\)"):  # a user's file: never replaced
        convert(src, dst, to="safetensors", progress=False, overwrite=True)
    assert snapshot(dst) == {"keep.txt": b"mine"}
    (dst / "keep.txt").unlink()
    convert(src, dst, to="safetensors", progress=False)  # an empty folder needs no --overwrite
    convert(src, dst, to="safetensors", progress=False, overwrite=True)  # its own earlier output
    assert sorted(p.name for p in dst.iterdir()) == [".opt-manifest.json", "config.json", "model.safetensors"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_never_overwrites_an_input(src, tmp_path):
    before = snapshot(src)
    with pytest.raises(ValueError, match="holds the input"):
        convert(src, src, to="safetensors", progress=False, overwrite=True)
    with pytest.raises(ValueError, match="holds the input"):
        convert(src, tmp_path, to="safetensors", progress=False, overwrite=True)
    assert snapshot(src) == before


def test_a_failure_while_streaming_leaves_nothing(src, tmp_path, monkeypatch):
    from opt_core.formats import safetensors as safetensors_format

    calls = {"n": 0}
    real = safetensors_format.SafetensorsReader.read

    def flaky(self, key, out=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return real(self, key, out)

    monkeypatch.setattr(safetensors_format.SafetensorsReader, "read", flaky)
    for to in ("safetensors", "bin", "tf-h5", "flax-msgpack"):
        calls["n"] = 0
        with pytest.raises(OSError, match="disk went away"):
            convert(src, tmp_path / to, to=to, progress=False)
        _nothing_written(tmp_path / to)


def test_bad_arguments(src, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        convert(src, tmp_path / "o", to="safetensors", dtype="fp8")
    with pytest.raises(ValueError, match="cannot write format"):
        convert(src, tmp_path / "o", to="onnx")
    with pytest.raises(ValueError, match="shard_size applies to safetensors and bin"):
        convert(src, tmp_path / "o", to="tf-h5", shard_size="1GB")
    with pytest.raises(FileNotFoundError, match="holds no OPT weights"):
        convert(tmp_path, tmp_path / "o", to="bin")
    _nothing_written(tmp_path / "o")


# ---------------------------------------------------------------- the command line
def test_cli_converts_and_verifies(src, tmp_path, capsys):
    rc = main(["convert", str(src), str(tmp_path / "out"), "--to", "flax-msgpack", "--dtype", "bf16",
               "--verify", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "bit-exact" in out and "flax-msgpack" in out
    got = read_canonical(tmp_path / "out", "flax-msgpack")
    assert got["decoder.embed_tokens.weight"].dtype.name == "bfloat16"


def test_cli_errors_are_one_paragraph_and_nonzero(src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")  # an empty folder is a fine destination
    rc = main(["convert", str(src), str(tmp_path / "out"), "--to", "safetensors", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    rc = main(["convert", str(src), str(tmp_path / "new"), "--to", "bin", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "truncated" in err and "Traceback" not in err  # unusable input: exit 1
    rc = main(["convert", str(tmp_path / "nothing"), str(tmp_path / "new"), "--to", "bin"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    _nothing_written(tmp_path / "new")
