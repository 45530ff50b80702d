"""Odd inputs through the real `opt` entry point: one clear line naming the file or flag (never a
traceback), or the right result; a closed output pipe ends the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from opt_cli.options import usable_cpus
from opt_core import bundled
from tests.cli.entry import ROOT, lines, one_line_error, opt, opt_argv, user_env

BUNDLED = str(bundled.path())


# ---------------------------------------------------------------- a closed pipe
def test_a_closed_output_pipe_exits_quietly():
    """`opt generate ... | head -1` once head has gone: no traceback, no 'Exception ignored', exit 141
    (128 + SIGPIPE, what a shell shows for any tool stopped this way)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write fails with EPIPE
    try:
        proc = subprocess.run(opt_argv("generate", "--max-new-tokens", "4"), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=user_env(), cwd=ROOT, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr and "Exception" not in proc.stderr
    assert lines(proc.stderr) == []


def test_head_dash_one_in_a_shell_shows_one_line_and_nothing_else():
    cmd = " ".join(f"'{a}'" for a in opt_argv("generate", "--max-new-tokens", "30", "--stream")) + " | head -1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=user_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr and "Exception" not in proc.stderr


# ---------------------------------------------------------------- flags
def test_threads_beyond_the_cpus_is_a_usage_error():
    err = one_line_error(opt("generate", "--threads", "100000"), 2, "generate")
    assert f"--threads: must be an integer (threads, at most the CPUs this process may use) in [1, {usable_cpus()}], " \
           "got 100000" in err


def test_fsdp_outside_torchrun_names_torchrun_not_tp_plan(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n" * 50)
    err = one_line_error(opt("train", "--corpus", corpus, "--out", tmp_path / "out", "--fsdp"), 2, "train")
    assert "--fsdp shards over the processes of a torchrun launch" in err and "tp_plan" not in err
    assert not (tmp_path / "out").exists()
    err = one_line_error(opt("generate", "--tp-plan", "auto"), 2, "generate")
    assert "--tp-plan shards over the processes of a torchrun launch" in err


@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_calibration_with_a_backend_that_has_no_smoothing_is_refused(tmp_path, backend):
    text = tmp_path / "t.txt"
    text.write_text("the king hath said\n" * 20)
    err = one_line_error(opt("generate", "--backend", backend, "--quantize", "w8a8", "--calibration", text,
                             "--max-new-tokens", "2"), 2, "generate")
    assert f"--calibration (SmoothQuant factors) is torch only: the {backend} backend's w8a8" in err


def test_tf_bfloat16_with_int8_is_refused_up_front():
    err = one_line_error(opt("generate", "--backend", "tf", "--dtype", "bfloat16", "--quantize", "int8",
                             "--max-new-tokens", "2"), 2, "generate")
    assert "quantize='int8' in opt_tf needs dtype float32" in err and "not bfloat16" in err


@pytest.mark.parametrize("kind, message", [
    ("folder", "--calibration {path} is a folder, not a text file"),
    ("fifo", "--calibration {path} is a FIFO (named pipe), not a text file"),
    ("device", "--calibration /dev/null is a device, not a text file"),
    ("missing", "--calibration {path} does not exist"),
])
def test_calibration_paths_are_named_by_kind(tmp_path, kind, message):
    path = {"folder": tmp_path, "fifo": tmp_path / "fifo", "device": "/dev/null", "missing": tmp_path / "no.txt"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    err = one_line_error(opt("generate", "--quantize", "w8a8", "--calibration", path, timeout=120), 2, "generate")
    assert message.format(path=path) in err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x7fELF\x02\x01\x01\x00" * 8, "holds a NUL byte at offset 7: a binary file, not text"),
    (b"caf\xe9 au lait", "is not UTF-8 text"),
])
def test_empty_or_binary_calibration_text_is_named(tmp_path, content, message):
    path = tmp_path / "cal.txt"
    path.write_bytes(content)
    err = one_line_error(opt("generate", "--quantize", "w8a8", "--calibration", path, "--max-new-tokens", "2",
                             OPT_CACHE=str(tmp_path / "cache")), 2, "generate")
    assert f"calibration text {path} {message}" in err
    assert "\\x" not in err


def test_eval_ppl_with_a_binary_text_is_one_line(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"abc\x00def")
    err = one_line_error(opt("eval-ppl", "--text", path, "--no-progress"), 2, "eval-ppl")
    assert f"--text {path} holds a NUL byte at offset 3" in err


# ---------------------------------------------------------------- destinations
def test_destination_dot_is_the_current_folder(tmp_path):
    dst = tmp_path / "here"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    # the current folder always exists: named by its path (it was "PosixPath('.') has an empty name")
    err = one_line_error(opt("convert", BUNDLED, ".", "--to", "safetensors", cwd=dst), 2, "convert")
    assert str(dst) in err and "--overwrite" in err and "PosixPath" not in err
    (dst / "notes.txt").unlink()
    proc = opt("convert", BUNDLED, ".", "--to", "safetensors", cwd=dst)  # an empty folder needs no --overwrite
    assert proc.returncode == 0, proc.stderr
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    proc = opt("convert", BUNDLED, ".", "--to", "safetensors", "--overwrite", cwd=dst)  # its own earlier output
    assert proc.returncode == 0, proc.stderr
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- calibration results and opt info
def test_calibration_writes_to_the_user_cache_never_the_package(tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40)
    before = sorted(os.listdir(BUNDLED))
    proc = opt("generate", "--quantize", "w8a8", "--calibration", text, "--max-new-tokens", "3",
               OPT_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(BUNDLED)) == before
    cached = list((tmp_path / "cache" / "smoothquant").glob("*.safetensors"))
    assert len(cached) == 1


def test_info_shows_the_smoothing_file_apart_from_the_weights(tmp_path):
    import shutil

    from safetensors.numpy import save_file

    folder = tmp_path / "m"
    shutil.copytree(BUNDLED, folder)
    plain = opt("info", folder)
    assert plain.returncode == 0, plain.stderr
    dtype_line = next(ln for ln in plain.stdout.splitlines() if ln.startswith("dtype"))
    save_file({"g": np.ones(4, np.float32), "h": np.ones(4, np.float32)}, str(folder / "smoothquant.safetensors"))
    proc = opt("info", folder)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert next(ln for ln in out if ln.startswith("dtype")) == dtype_line  # not counted as weights
    smoothing = next(ln for ln in out if ln.startswith("smoothing"))
    assert "smoothquant.safetensors: SmoothQuant factors for w8a8, 2 groups" in smoothing
    assert "not weights" in smoothing and "not bound to these weights" in smoothing
    assert "smoothing" in opt("info", folder, "--json").stdout


# ---------------------------------------------------------------- generate pads left
def test_generate_encodes_prompts_padded_on_the_left():
    from opt_cli.commands_generate import encode_prompts
    from opt_core import OPTConfig, OPTTokenizer

    tok = OPTTokenizer.from_pretrained(BUNDLED)
    config = OPTConfig.from_pretrained(BUNDLED)
    ids, mask = encode_prompts(tok, config, ["ROMEO:", "KING HENRY: my lord, what say you?"], 4)
    assert mask[1].all() and not mask[0, 0] and mask[0, -1]  # padding before the short prompt, not after
    assert ids[0, -1] == tok.encode("ROMEO:")[-1]
    assert ids[0, 0] == tok.pad_token_id


def test_generate_output_is_unaffected_by_padding_warning_machinery():
    proc = opt("generate", "--max-new-tokens", "3")
    assert proc.returncode == 0 and "right-padding" not in proc.stderr


if sys.platform != "linux":  # FIFOs, /dev/null and sched_getaffinity as on Linux
    pytestmark = pytest.mark.skip(reason="Linux-only file kinds")


# ---------------------------------------------------------------- generation limits through the CLI
def test_a_temperature_that_overflows_float32_is_one_line():
    err = one_line_error(opt("generate", "--do-sample", "--temperature", "1e-40", "--max-new-tokens", "2"), 2,
                         "generate")
    assert "temperature must be in [1e-06, 1e+06] (so float32 logits stay finite) when sampling, got 1e-40" in err


def test_num_beams_from_the_file_names_the_file_and_the_limit(tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(BUNDLED, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "num_beams": 10**6}))
    err = one_line_error(opt("generate", "--model", folder, "--max-new-tokens", "2"), 2, "generate")
    assert f"{folder / 'generation_config.json'}: num_beams must be an integer in [1, 256] (the limit " \
           "MAX_NUM_BEAMS: every beam holds a full KV cache), got 1000000" in err
