"""The same hostile files through the command line: one paragraph naming the file, no traceback,
non-zero exit (in-process `main`, as tests/conversion/test_hostile.py drives it)."""

from __future__ import annotations

import struct

import pytest

from opt_cli.main import main
from tests.hostile import fixtures


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("command", ["convert", "info"])
def test_deep_config_json(tmp_path, capsys, command):
    folder = fixtures.tiny_model(tmp_path / "m")
    (folder / "config.json").write_bytes(fixtures.deep_json())
    argv = ["convert", str(folder), str(tmp_path / "out"), "--to", "bin", "--no-progress"] if command == "convert" \
        else ["info", str(folder)]
    rc, text = _run(argv, capsys)
    assert rc != 0 and "Traceback" not in text
    assert f"{folder / 'config.json'} nests JSON 100000 levels deep; the limit is 64" in text, text


def test_info_neither_follows_links_out_nor_quotes_bytes(tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.write_bytes(b"daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    (as_number,) = struct.unpack("<Q", secret.read_bytes()[:8])
    folder = fixtures.tiny_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    rc, text = _run(["info", str(folder)], capsys)
    assert rc != 0 and "outside the model folder" in text, text
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(secret.read_bytes())
    rc, text = _run(["info", str(folder)], capsys)
    assert rc != 0 and "malformed safetensors header" in text, text
    for leaked in ("daemon", str(as_number), f"{as_number:,}"):
        assert leaked not in text.replace(str(tmp_path), ""), text


@pytest.mark.torch
def test_smoothing_file_linked_from_outside(tmp_path):
    import torch

    from opt_core.checkpoint import CheckpointError
    from opt_torch.quantize import SMOOTHING_FILE, load_smoothing, save_smoothing

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_smoothing(elsewhere / SMOOTHING_FILE, {"decoder.layers.0.fc1": torch.ones(4)}, {"alpha": 0.5})
    folder = fixtures.tiny_model(tmp_path / "m")
    (folder / SMOOTHING_FILE).symlink_to(elsewhere / SMOOTHING_FILE)
    with pytest.raises(CheckpointError, match=rf"{folder / SMOOTHING_FILE} is a link to {elsewhere / SMOOTHING_FILE}, "
                                              "outside the model folder"):
        load_smoothing(folder / SMOOTHING_FILE)
    factors, meta = load_smoothing(elsewhere / SMOOTHING_FILE)  # the file itself is fine
    assert meta == {"alpha": 0.5} and list(factors) == ["decoder.layers.0.fc1"]
