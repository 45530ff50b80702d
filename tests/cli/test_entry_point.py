"""The command line's promises, each through the real `opt` entry point (`python -m opt_cli.main`
in a subprocess): version and help, output folders and --overwrite, interrupted runs, `opt info` on broken folders,
`bundled` everywhere, reported adjustments, progress and speed lines, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from tests.cli.entry import ROOT, lines, one_line_error, opt, opt_argv, user_env


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def model_without_weights(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    return folder


# ---------------------------------------------------------------- version and help
def test_version():
    proc = opt("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("opt (opt-reference) 0.")


@pytest.mark.parametrize(
    "command, expected",
    [
        ("generate", ["--max-new-tokens N tokens to generate (default: 40)", "--backend NAME one of: torch, tf, flax "
                      "(default: torch)", "--model DIR", "(default: bundled)", "--seed SEED", "(default: fresh"]),
        ("train", ["--steps STEPS optimiser steps (default: 400)", "--seed SEED", "(default: 0)",
                   "--warmup WARMUP linear warm-up steps (at most --steps) (default: 40)"]),
        ("eval-ppl", ["--window N tokens per window (default: the model's context", "--stride N"]),
        ("demo", ["--max-new-tokens N greedy tokens per backend (default: 40)", "(default: torch,tf,flax)"]),
        ("verify", ["--new-tokens N greedy tokens to compare (default: 16)", "(default: float32)"]),
        ("convert", ["--overwrite"]),
        ("info", ["MODEL"]),
    ],
)
def test_every_help_shows_defaults(command, expected):
    proc = opt(command, "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    for piece in expected:
        assert piece in text, piece


def test_every_option_with_a_default_documents_it():
    """Structural check over every subcommand: an option whose default is a value says so in --help."""
    import argparse

    from opt_cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            assert "default" in (p.formatter_class(name)._get_help_string(action) or ""), (name, action.dest)


# ---------------------------------------------------------------- output folders
def test_train_refuses_a_non_empty_out_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    err = one_line_error(opt("train", "--corpus", tiny_model_dir / "text.txt", "--out", out), 2, "train")
    assert "is not empty" in err and "--overwrite" in err
    assert (out / "config.json").read_text() == "{}"


def test_overwrite_never_deletes_files_the_command_did_not_write(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    err = one_line_error(opt("train", "--corpus", tiny_model_dir / "text.txt", "--out", out, "--overwrite"),
                         2, "train")
    assert "does not write (notes.txt)" in err
    err = one_line_error(opt("convert", "bundled", out, "--to", "safetensors", "--overwrite"), 2, "convert")
    assert "does not write (notes.txt)" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]


def test_convert_bundled_overwrite_and_a_killed_runs_temp_folder(tmp_path):
    out = tmp_path / "out"
    token = "0123456789abcdef" * 2
    stale = tmp_path / f".out.opt-tmp-{token}"  # what a killed conversion leaves: marker inside
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    (stale / ".opt-transaction").write_text(json.dumps(
        {"format": "opt-transaction", "token": token, "dst": "out", "pid": dead_pid(), "role": "opt-tmp",
         "state": "writing"}))
    users = tmp_path / f".out.opt-tmp-{'f' * 32}"  # a user's folder that only looks like one
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    proc = opt("convert", "bundled", out, "--to", "safetensors", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and "left by an interrupted write" in proc.stderr
    assert (users / "thesis.tex").read_text() == "mine"
    users.joinpath("thesis.tex").unlink()
    users.rmdir()
    assert (out / "model.safetensors").is_file() and (out / "vocab.json").is_file()
    err = one_line_error(opt("convert", "bundled", out, "--to", "bin", "--no-progress"), 2, "convert")
    assert "--overwrite" in err
    proc = opt("convert", "bundled", out, "--to", "bin", "--no-progress", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "pytorch_model.bin").is_file() and not (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.torch
def test_train_reports_adjusted_arguments_and_overwrites_its_own_run(tiny_model_dir, tmp_path):
    from opt_core.transaction import write_manifest

    out = tmp_path / "run"
    (out / "checkpoint-99").mkdir(parents=True)  # what a longer earlier run leaves, listed as its own
    (out / "config.json").write_text("{}")
    write_manifest(out, {"checkpoint-99": "folder", "config.json": "file"})
    proc = opt("train", "--corpus", tiny_model_dir / "text.txt", "--out", out, "--overwrite", "--vocab-size", "5000",
               "--hidden-size", "16", "--layers", "1", "--heads", "2", "--ffn-dim", "32", "--context", "16",
               "--steps", "2", "--batch-size", "2", "--warmup", "50", "--eval-every", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in lines(proc.stderr) if ln.startswith("note: ")]
    assert any("--warmup 50 is longer than the run (--steps 2)" in n for n in notes), proc.stderr
    assert any("fewer than --vocab-size 5000" in n for n in notes), proc.stderr
    assert "the 2 files of a previous run" in proc.stdout and not (out / "checkpoint-99").exists()
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16


@pytest.mark.torch
def test_ctrl_c_prints_one_line_and_exits_130(tiny_model_dir, tmp_path):
    proc = subprocess.Popen(
        opt_argv("train", "--corpus", tiny_model_dir / "text.txt", "--out", tmp_path / "run", "--vocab-size", "300",
                 "--hidden-size", "16", "--layers", "1", "--heads", "2", "--ffn-dim", "32", "--context", "16",
                 "--steps", "100000", "--batch-size", "2", "--log-every", "1", "--eval-every", "0"),
        cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and lines(err) == ["opt train: interrupted"], err


# ---------------------------------------------------------------- opt info validates what it reads
def _truncated(folder):
    (folder / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b'{"a": 1}')


def _malformed(folder):
    header = b"not json at all!"
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


def _bad_entry(folder):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)


def _tiny(folder):
    (folder / "model.safetensors").write_bytes(b"\1\2")


def _fifo(folder):
    os.mkfifo(folder / "model.safetensors")


def _folder(folder):
    (folder / "model.safetensors").mkdir()


def _fifo_config(folder):
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


@pytest.mark.parametrize(
    "breakage, code, message",
    [
        (_truncated, 1, "truncated or malformed safetensors header"),
        (_malformed, 1, "malformed safetensors header: it is not valid JSON"),
        (_bad_entry, 1, "truncated safetensors file: 'w' ends at byte 400"),
        (_tiny, 1, "truncated safetensors file (2 bytes"),
        (_fifo, 1, "is a FIFO (named pipe), not a weights file"),
        (_folder, 1, "is a folder, not a weights file"),
        (_fifo_config, 2, "has a config.json that is a FIFO"),
    ],
    ids=["truncated", "malformed", "bad-offsets", "tiny", "fifo", "folder", "fifo-config"],
)
def test_info_rejects_broken_folders_in_one_line(tiny_model_dir, tmp_path, breakage, code, message):
    folder = model_without_weights(tmp_path, tiny_model_dir)
    breakage(folder)
    err = one_line_error(opt("info", folder, timeout=60), code, "info")
    assert message in err


def test_info_says_what_it_accepts(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    for arg, what in [(tmp_path / "weights.bin", "is a file, not a folder"), (tmp_path / "none", "does not exist"),
                      (tmp_path, "holds no config.json")]:
        err = one_line_error(opt("info", arg), 2, "info")
        assert what in err and "expected a model folder holding config.json" in err and "'bundled'" in err
    proc = opt("info", "bundled")
    assert proc.returncode == 0 and "parameters" in proc.stdout


# ---------------------------------------------------------------- progress, speed, threads
@pytest.mark.torch
def test_verify_accepts_bundled_and_shows_progress_per_backend():
    proc = opt("verify", "bundled", "--backends", "torch", "--new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    progress = [ln for ln in lines(proc.stderr) if ln.startswith("verify: ")]
    assert [p.split(":")[1].strip() for p in progress] == ["[1/2] reference", "[1/2] reference",
                                                           "[2/2] torch", "[2/2] torch"], progress
    assert "ok (load" in progress[-1]


@pytest.mark.torch
def test_generate_and_demo_speed_lines_exclude_compilation_and_take_threads(tiny_model_dir):
    proc = opt("generate", "--model", tiny_model_dir, "--max-new-tokens", "6", "--threads", "1", "--stream")
    assert proc.returncode == 0, proc.stderr
    speed = lines(proc.stderr)[-1]
    assert "tokens/s" in speed and "excludes prefill and compilation" in speed, proc.stderr
    proc = opt("demo", "--model", tiny_model_dir, "--backends", "torch", "--max-new-tokens", "4", "--threads", "1",
               "--prompt", "ROMEO:")
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s on the second call, excluding compilation" in proc.stdout


# ---------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    "argv, command, message",
    [
        (["verify", "bundled", "--tokenizer", "{tmp}/MISSING"], "verify", "--tokenizer: {tmp}/MISSING does not exist"),
        (["eval-ppl", "--text", "{tmp}/text.txt", "--stride", "0"], "eval-ppl",
         "argument --stride: must be an integer >= 1, got 0"),
        (["generate", "--seed", "1e20"], "generate",
         "argument --seed: must be an integer seed in [0, 2**64), got '1e20'"),
        (["generate", "--seed", str(2**64)], "generate", "argument --seed: must be an integer seed in [0, 2**64)"),
        (["generate", "--threads", "0"], "generate",
         "argument --threads: must be an integer (threads, at most the CPUs this process may use) in [1, "),
        (["generate", "--model", "{tmp}/text.txt"], "generate", "--model: {tmp}/text.txt is a file, not a folder"),
        (["eval-ppl", "--text", "{tmp}", "--model", "bundled"], "eval-ppl", "--text: {tmp} is a folder, not a regular"),
        (["train", "--corpus", "{tmp}/text.txt", "--out", "{tmp}/text.txt"], "train",
         "--out: {tmp}/text.txt is a file, not a folder"),
        (["train", "--corpus", "{tmp}/text.txt", "--out", "{tmp}/o", "--init", "{tmp}/text.txt"], "train",
         "--init: {tmp}/text.txt is a file, not a folder"),
        (["convert", "bundled", "{tmp}/text.txt", "--to", "bin"], "convert", "DST: {tmp}/text.txt is a file"),
        (["demo", "--backends", "torch,paddle"], "demo", "unknown backend(s) paddle"),
        (["train", "--corpus", "{tmp}/text.txt", "--out", "{tmp}/o", "--backend", "flax", "--fsdp"], "train",
         "--fsdp needs a backend that trains under torchrun (torch), not flax"),
    ],
)
def test_bad_arguments_are_one_clear_line(tmp_path, argv, command, message):
    (tmp_path / "text.txt").write_text("some text to read\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    err = one_line_error(opt(*argv), 2, command)
    assert message.format(tmp=tmp_path) in err, err
