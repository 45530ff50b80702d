"""`opt convert --shard-size` through the real entry point: a size without its unit is refused."""

from __future__ import annotations

from tests.cli.entry import one_line_error, opt


def test_convert_refuses_a_shard_size_without_a_unit(tiny_model_dir, tmp_path):
    proc = opt("convert", tiny_model_dir, tmp_path / "out", "--to", "safetensors", "--shard-size", "10")
    line = one_line_error(proc, 2, "convert")
    assert "10" in line and "unit" in line
    assert not (tmp_path / "out").exists()
