"""One exit-code rule through the real entry point: 2 for a bad argument, 1 for an input that cannot
be used, whichever command read it (a truncated model.safetensors exited 2 from generate and eval-ppl
and 1 from convert, info and verify)."""

from __future__ import annotations

import os
import shutil

import pytest

from opt_core import bundled
from tests.cli.entry import ROOT, lines, opt


@pytest.fixture(scope="module")
def truncated_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truncated") / "model"
    shutil.copytree(bundled.path(), folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return folder


@pytest.mark.torch
@pytest.mark.parametrize("argv", [
    ["generate", "--model", "{m}", "--max-new-tokens", "2"],
    ["eval-ppl", "--model", "{m}", "--text", str(ROOT / "data" / "corpus" / "tinyshakespeare.txt"),
     "--max-tokens", "64"],
    ["info", "{m}"],
    ["convert", "{m}", "{out}", "--to", "bin"],
], ids=lambda argv: argv[0])
def test_a_truncated_weights_file_exits_1_from_every_command(argv, truncated_model, tmp_path):
    proc = opt(*[a.format(m=truncated_model, out=tmp_path / "out") for a in argv])
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = lines(proc.stderr)
    assert len(err) == 1 and "model.safetensors" in err[0] and "truncated" in err[0], proc.stderr


def test_a_missing_model_folder_is_an_argument_exit_2(tmp_path):
    proc = opt("generate", "--model", tmp_path / "nowhere", "--max-new-tokens", "2")
    assert proc.returncode == 2, proc.stderr
