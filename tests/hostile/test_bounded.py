"""A tiny hostile file stays tiny: each file here once made the library allocate gigabytes, hang,
or crash with a traceback. Each is now refused with one clear error naming the file, within 5 s and
200 MB more than the interpreter's own, measured in a fresh process (`tests.hostile.bounded`)."""

from __future__ import annotations

import json
import os
import struct

import pytest

from tests.hostile import fixtures
from tests.hostile.bounded import assert_refused, run_bounded

LOAD = """
from opt_core import OPTConfig
from opt_core.checkpoint import open_checkpoint
"""


def load(folder, fmt=None) -> str:
    """Child-side statements: read the folder's config, open its weights, read every tensor."""
    return f"""
folder = {str(folder)!r}
config = OPTConfig.from_pretrained(folder)
with open_checkpoint(folder, config, "causal_lm", fmt={fmt!r}) as ckpt:
    for name in ckpt.names:
        ckpt.read(name)
"""


def convert(folder, out) -> str:
    return f"""
from conversion import convert
convert({str(folder)!r}, {str(out)!r}, to="safetensors", progress=False)
"""


# ---------------------------------------------------------------- shapes vs bytes present
@pytest.mark.torch
@pytest.mark.parametrize("overlap", [False, True], ids=["stride-0", "overlapping-strides"])
def test_bin_views_larger_than_their_storage(tmp_path, overlap):
    path = fixtures.stride0_bin(tmp_path / "m", overlap=overlap)
    assert path.stat().st_size < 200_000 if not overlap else True
    for action in (load(tmp_path / "m"), convert(tmp_path / "m", tmp_path / "out")):
        outcome = run_bounded(action, LOAD)
        assert_refused(outcome, "CheckpointError", r"view whose elements overlap", names=path)
    assert not (tmp_path / "out").exists()


def test_h5_datasets_declared_but_never_written(tmp_path):
    path = fixtures.unwritten_h5(tmp_path / "m")
    assert path.stat().st_size < 200_000
    outcome = run_bounded(load(tmp_path / "m"), LOAD)
    assert_refused(outcome, "CheckpointError", r"declared .* but never written", names=path)


def test_h5_partly_written_file_names_the_first_unwritten_dataset(tmp_path):
    path = fixtures.unwritten_h5(tmp_path / "m", fixtures.TINY, written=3)
    outcome = run_bounded(load(tmp_path / "m"), LOAD)
    assert_refused(outcome, "CheckpointError", r"model/decoder/embed_positions.* never written|never written",
                   names=path)


def test_h5_zeros_compressed_beyond_what_weights_compress_to(tmp_path):
    path = fixtures.unwritten_h5(tmp_path / "m", fixtures.TINY, compressed=True)
    outcome = run_bounded(load(tmp_path / "m"), LOAD)
    assert_refused(outcome, "CheckpointError", r"compressed bytes, more than 16x compression", names=path)


def test_config_with_ten_million_layers_is_refused_by_its_limit(tmp_path):
    fixtures.tiny_model(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 10_000_000
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps(config))
    assert path.stat().st_size < 2000
    outcome = run_bounded(load(tmp_path / "m"), LOAD)
    assert_refused(outcome, "ValueError", r"num_hidden_layers = 10000000 is above this library's limit of 1024",
                   names=path)


def test_config_far_larger_than_the_weights_on_disk(tmp_path):
    """Every size within its limit, but the decoder it implies needs far more bytes than the files
    hold: refused before the parameter table is matched or anything is allocated."""
    fixtures.tiny_model(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(hidden_size=8192, num_attention_heads=64, ffn_dim=32768, num_hidden_layers=64)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    for action in (load(tmp_path / "m"), convert(tmp_path / "m", tmp_path / "out")):
        outcome = run_bounded(action, LOAD)
        assert_refused(outcome, "CheckpointError",
                       r"config implies a decoder of [\d,]+ parameters .* weight files hold", names=tmp_path / "m")


def test_total_parameter_limit_names_itself():
    from opt_core import OPTConfig

    with pytest.raises(ValueError, match=r"above this library's limit of 2e\+12 \(opt_core.config.MAX_PARAMETERS\)"):
        OPTConfig(hidden_size=65536, num_attention_heads=512, ffn_dim=262144, num_hidden_layers=1024)


# ---------------------------------------------------------------- bounded reprs
def test_pickle_of_shared_nested_tuples_errors_at_once(tmp_path):
    path = fixtures.nested_tuple_bin(tmp_path / "m")
    assert path.stat().st_size < 2000
    for action in (load(tmp_path / "m"), convert(tmp_path / "m", tmp_path / "out")):
        outcome = run_bounded(action, LOAD, timeout=60)
        assert_refused(outcome, "CheckpointError", r"unsupported persistent id", names=path)
        assert len(outcome.message) < 1000


def test_pickle_nesting_beyond_the_limit_is_refused_before_unpickling(tmp_path):
    path = fixtures.shared_key_bin(tmp_path / "m")
    assert path.stat().st_size < 1000
    outcome = run_bounded(load(tmp_path / "m"), LOAD, timeout=60)
    assert_refused(outcome, "CheckpointError", r"nests objects more than 32 levels deep", names=path)


def test_pickle_memo_slot_far_ahead_is_refused_before_unpickling(tmp_path):
    path = fixtures.far_memo_bin(tmp_path / "m")
    outcome = run_bounded(load(tmp_path / "m"), LOAD, timeout=60)
    assert_refused(outcome, "CheckpointError", r"uses memo slot 1073741824 after 3 opcodes", names=path)


def test_bounded_repr_of_a_shared_tuple_is_short_and_fast():
    import time

    from opt_core.safe_files import bounded_repr

    t: tuple = ()
    for _ in range(500):
        t = (t, t)
    start = time.perf_counter()
    text = bounded_repr({"k": [t, 2**10_000, "x" * 10**6]})
    assert time.perf_counter() - start < 0.1 and len(text) <= 200
    assert "<int of 10001 bits>" in bounded_repr(2**10_000)


# ---------------------------------------------------------------- JSON: one reader, limits
JSON_FILES = {
    # file -> (what the folder needs besides it, error type)
    "config.json": "ValueError",
    "generation_config.json": "ValueError",
    "model.safetensors.index.json": "CheckpointError",
}


@pytest.mark.parametrize("name", list(JSON_FILES))
@pytest.mark.parametrize("how", ["deep", "utf8", "huge"])
def test_json_files_are_read_within_limits(tmp_path, name, how):
    folder = fixtures.tiny_model(tmp_path / "m")
    path = folder / name
    if how == "deep":
        path.write_bytes(fixtures.deep_json())
        match = r"nests JSON 100000 levels deep; the limit is 64"
    elif how == "utf8":
        path.write_bytes(b'{"a": "\xff\xfe"}')
        match = r"not valid UTF-8 \(invalid start byte at byte 7\)"
    else:
        with open(path, "wb") as f:  # sparse: 64 MB on paper, nothing on disk
            f.truncate(64 * 1024 * 1024)
        match = r"is 67,108,864 bytes, more than the [\d,]+ bytes allowed"
    action = load(folder) if name != "generation_config.json" else f"""
from opt_core.generation_config import GenerationConfig
GenerationConfig.from_pretrained({str(folder)!r})
"""
    assert_refused(run_bounded(action, LOAD), JSON_FILES[name], match, names=path)


def test_tokenizer_files_are_read_within_limits(tmp_path, tokenizer_dir):
    from opt_core import OPTTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    for f in ("merges.txt",):
        (folder / f).write_bytes((tokenizer_dir / f).read_bytes())
    (folder / "vocab.json").write_bytes(fixtures.deep_json(5000))
    with pytest.raises(ValueError, match=rf"{folder / 'vocab.json'} nests JSON 5000 levels deep"):
        OPTTokenizer.from_pretrained(folder)


def test_safetensors_header_json_limits_and_metadata(tmp_path):
    from opt_core.checkpoint import CheckpointError
    from opt_core.formats.safetensors import read_header

    deep = fixtures.safetensors_with_header(tmp_path / "deep.safetensors", fixtures.deep_json(10_000))
    with pytest.raises(CheckpointError, match=rf"safetensors header of {deep} nests JSON 10000 levels deep"):
        read_header(deep)
    for metadata in ('"a string"', "[1, 2]", '{"format": 3}'):
        path = fixtures.safetensors_with_header(tmp_path / "meta.safetensors",
                                                f'{{"__metadata__": {metadata}}}'.encode())
        with pytest.raises(CheckpointError, match=rf"{path}: the safetensors header's __metadata__ must be an object"):
            read_header(path)


# ---------------------------------------------------------------- special files
def _special(tmp_path, kind):
    folder = fixtures.tiny_model(tmp_path / "m")
    config = folder / "config.json"
    config.unlink()
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "dev-zero-link":
        config.symlink_to("/dev/zero")
    else:
        config.mkdir()
    return folder, config


SPECIAL = {"fifo": "FIFO", "dev-zero-link": "device", "folder": "folder"}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_special_file_as_config_json_is_refused_by_type(tmp_path, kind):
    folder, config = _special(tmp_path, kind)
    outcome = run_bounded(load(folder), LOAD, timeout=30)
    assert_refused(outcome, "ValueError", rf"is a {SPECIAL[kind]}, not a regular file", names=config)


def test_fifo_generation_config_is_refused_not_skipped(tmp_path):
    folder = fixtures.tiny_model(tmp_path / "m")
    os.mkfifo(folder / "generation_config.json")
    outcome = run_bounded(f"GenerationConfig.from_pretrained({str(folder)!r})",
                          "from opt_core.generation_config import GenerationConfig", timeout=30)
    assert_refused(outcome, "ValueError", r"is a FIFO, not a regular file", names=folder / "generation_config.json")


@pytest.mark.torch
def test_fifo_config_json_for_from_pretrained_does_not_block(tmp_path):
    folder, config = _special(tmp_path, "fifo")
    outcome = run_bounded(f"opt_torch.OPTForCausalLM.from_pretrained({str(folder)!r})", "import opt_torch",
                          timeout=60)
    assert_refused(outcome, "ValueError", r"is a FIFO, not a regular file", names=config)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_file_as_convert_config_is_refused(tmp_path, special):
    import subprocess
    import sys

    from tests.hostile.bounded import ROOT

    folder = fixtures.tiny_model(tmp_path / "m")
    if special == "fifo":
        special = str(tmp_path / "cfg.fifo")
        os.mkfifo(special)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "opt_cli.main", "convert", str(folder), str(tmp_path / "out"),
                           "--to", "bin", "--config", special, "--no-progress"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert special in proc.stderr and "not a regular file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- clear errors
@pytest.mark.torch
def test_truncated_zip_is_reported_as_a_truncated_zip(tmp_path):
    path = fixtures.truncated_bin(tmp_path / "m")
    outcome = run_bounded(load(tmp_path / "m"), LOAD)
    assert_refused(outcome, "CheckpointError", r"is a truncated or damaged zip archive", names=path)
    assert "pickle" not in outcome.message


@pytest.mark.torch
@pytest.mark.parametrize("field,value,want", [
    ("decoder_attention_heads", "4", "an integer"),
    ("decoder_attention_heads", 4.0, "an integer"),
    ("decoder_normalize_before", "yes", "true/false"),
    ("activation_fn", 3, "a string"),
    ("dropout", "0.1", "a number"),
    ("decoder_layers", True, "an integer"),
])
def test_metaseq_cfg_field_of_the_wrong_type(tmp_path, field, value, want):
    from opt_core.checkpoint import CheckpointError
    from opt_core.formats import open_reader

    cfg = {"decoder_attention_heads": fixtures.TINY.num_attention_heads, "decoder_normalize_before": True,
           field: value}
    path = fixtures.metaseq_with_cfg(tmp_path / "ms", cfg)
    with pytest.raises(CheckpointError, match=rf"the cfg of {path}: field {field} must be {want}, got "):
        open_reader(tmp_path / "ms", "metaseq")


def test_error_never_quotes_the_bytes_of_a_refused_file(tmp_path):
    """A passwd-like file posing as safetensors: its first 8 bytes read as a header length would
    spell `root:x:0`; no error may show them, as text or as that number."""
    from opt_core.checkpoint import CheckpointError
    from opt_core.formats.safetensors import read_header

    secret = b"root:x:0:0:root:/root:/bin/bash\n"
    path = tmp_path / "model.safetensors"
    path.write_bytes(secret)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = str(info.value).replace(str(path), "<path>")
    assert message.startswith("<path>")
    (as_number,) = struct.unpack("<Q", secret[:8])
    assert "root" not in message and str(as_number) not in message and f"{as_number:,}" not in message


@pytest.mark.torch
def test_views_torch_save_writes_still_load(tmp_path):
    """Transposed, row-sliced and tied (one storage, two names) tensors load with their values; a
    storage read three times over is refused."""
    import numpy as np
    import torch

    from opt_core.checkpoint import CheckpointError
    from opt_core.formats.torch_bin import TorchBinReader

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "views.bin"
    torch.save({"transposed": base.t(), "tied": base, "rows": torch.arange(8.0)[::2]}, path)
    with TorchBinReader(path, files=[path]) as reader:
        np.testing.assert_array_equal(reader.read("transposed"), base.t().numpy())
        np.testing.assert_array_equal(reader.read("tied"), base.numpy())
        np.testing.assert_array_equal(reader.read("rows"), np.arange(8.0, dtype=np.float32)[::2])
    torch.save({"a": base, "b": base, "c": base}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: tensors view storage .* more than 2 times its size"):
        TorchBinReader(path, files=[path])
