"""Writing never loses a user's file, and a crash or Ctrl-C at any moment leaves a complete model
(`opt_core.transaction`), through the real `opt` entry point, the conversion library and every
backend's `save_pretrained`.

The user's files are those a user really had when name patterns decided ownership: a
`model-notes-of-2024.safetensors`, a folder `config.json/` holding a `.tex`, a `checkpoint-keep/`,
a folder `vocab.json/`, and folders beside the output named like the temporary folders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from opt_core import OPTConfig, bundled
from opt_core.checkpoint import load_numpy_state_dict
from opt_core.transaction import (
    MANIFEST_NAME,
    DestinationExistsError,
    ForeignFilesError,
    WriteTransaction,
    classify,
    read_manifest,
    recover,
)
from tests.cli.entry import ROOT, one_line_error, opt, opt_argv, user_env

BUNDLED = bundled.path()
TEMP_LOOKALIKE = ".out.opt-tmp-" + "ab" * 16  # named exactly like a temporary folder, no marker


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder`: file -> bytes, folder -> None."""
    out: dict[str, bytes | None] = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() else None
    return out


def plant_user_files(folder: Path, *, blocking: bool = True) -> None:
    """The issue's user files in `folder` (`blocking`: also the folders named like model files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-notes-of-2024.safetensors").write_bytes(b"my notes, not weights")
    (folder / "checkpoint-keep").mkdir()
    (folder / "checkpoint-keep" / "optimizer-notes.txt").write_text("keep me")
    if blocking:
        (folder / "config.json").mkdir()
        (folder / "config.json" / "paper.tex").write_text("\\documentclass{article}")
        (folder / "vocab.json").mkdir()
        (folder / "vocab.json" / "words.txt").write_text("mine")


def plant_lookalike(parent: Path) -> Path:
    look = parent / TEMP_LOOKALIKE
    look.mkdir()
    (look / "draft.txt").write_text("not a temporary folder")
    return look


def weights(folder: Path) -> dict[str, np.ndarray]:
    """The folder's model as a complete, consistent checkpoint (config + weights, every key)."""
    config = OPTConfig.from_pretrained(folder)
    state, acc = load_numpy_state_dict(folder, config, "causal_lm")
    assert acc.ok
    return state


def same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].astype(np.float32), b[k].astype(np.float32)) for k in a)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- ownership
def test_owned_is_the_manifest_and_exact_model_names_never_a_pattern(tmp_path):
    folder = tmp_path / "m"
    plant_user_files(folder)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "checkpoint-7").mkdir()
    (folder / "notes-of-mine.bin").write_bytes(b"x")
    owned, foreign = classify(folder)
    assert owned == {"model.safetensors": "file"}  # a regular file with exactly a model file's name
    assert foreign == ["checkpoint-7/", "checkpoint-keep/", "config.json/", "model-notes-of-2024.safetensors",
                       "notes-of-mine.bin", "vocab.json/"]
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": "opt-manifest", "version": 1,
                                                    "entries": {"checkpoint-7": "folder", "config.json": "file"}}))
    owned, foreign = classify(folder)
    # listed as a file, but a folder is there now: the user's
    assert owned == {"checkpoint-7": "folder", "model.safetensors": "file"} and "config.json/" in foreign
    (folder / MANIFEST_NAME).write_text('{"entries": {"../x": "file"}}')
    with pytest.raises(OSError, match=r"\.opt-manifest\.json is not a manifest"):
        classify(folder)


def test_overwrite_refuses_foreign_entries_and_deletes_nothing(tmp_path):
    dst = tmp_path / "out"
    plant_user_files(dst)
    before = snapshot(dst)
    with pytest.raises(ForeignFilesError) as e:
        WriteTransaction(dst, overwrite=True).begin()
    assert e.value.names == ["checkpoint-keep/", "config.json/", "model-notes-of-2024.safetensors", "vocab.json/"]
    assert "model-notes-of-2024.safetensors" in str(e.value)
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        WriteTransaction(dst).begin()
    assert snapshot(dst) == before and hidden(tmp_path) == []


def test_recover_never_removes_a_lookalike_folder(tmp_path):
    look = plant_lookalike(tmp_path)
    marker_of_a_live_process = tmp_path / (".out.opt-tmp-" + "cd" * 16)
    marker_of_a_live_process.mkdir()
    (marker_of_a_live_process / ".opt-transaction").write_text(json.dumps(
        {"format": "opt-transaction", "token": "cd" * 16, "dst": "out", "pid": os.getpid(), "role": "opt-tmp",
         "state": "writing"}))
    wrong_token = tmp_path / (".out.opt-tmp-" + "ef" * 16)  # a marker copied from elsewhere
    wrong_token.mkdir()
    (wrong_token / ".opt-transaction").write_text(json.dumps(
        {"format": "opt-transaction", "token": "00" * 16, "dst": "out", "pid": 1 << 30, "role": "opt-tmp",
         "state": "writing"}))
    assert recover(tmp_path / "out") == []
    assert (look / "draft.txt").read_text() == "not a temporary folder"
    assert marker_of_a_live_process.is_dir() and wrong_token.is_dir()


# ---------------------------------------------------------------- save_pretrained, every backend
def test_save_pretrained_keeps_user_files_and_replaces_only_its_own(backend, tmp_path):
    from tests.variants import VARIANTS

    model = backend.build(VARIANTS["pre_ln"])
    dst = tmp_path / "saved"
    plant_user_files(dst, blocking=False)
    plant_lookalike(tmp_path)
    users = snapshot(dst)
    backend.save(model, dst, max_shard_size="20KB")  # sharded
    shards = sorted(p.name for p in dst.glob("model-0*.safetensors"))
    assert len(shards) > 1 and set(read_manifest(dst)) >= {"config.json", "model.safetensors.index.json", *shards}
    backend.save(model, dst)  # one file: its own earlier shards go, the user's look-alike stays
    after = snapshot(dst)
    assert {k: v for k, v in after.items() if k in users} == users
    assert not list(dst.glob("model-0*.safetensors")) and (dst / "model.safetensors").is_file()
    got, want = weights(dst), backend.params(model)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert hidden(tmp_path) == [TEMP_LOOKALIKE]
    (dst / "config.json").unlink()
    (dst / "config.json").mkdir()  # a folder where config.json goes: refused, nothing replaced
    (dst / "config.json" / "paper.tex").write_text("mine")
    before = snapshot(dst)
    with pytest.raises(OSError, match=r"config\.json/"):
        backend.save(model, dst)
    assert snapshot(dst) == before and hidden(tmp_path) == [TEMP_LOOKALIKE]


# ---------------------------------------------------------------- a crash at every step of the swap
CRASH_SCRIPT = """
import sys
import numpy as np
from opt_core import OPTConfig
from opt_core.checkpoint import load_numpy_state_dict, save_checkpoint
import opt_core.transaction as t

how, src, dst, scale, shard, exchange = sys.argv[1:7]
if exchange == "0":  # the systems without renameat2(RENAME_EXCHANGE): two renames
    plain = t._renameat2
    t._renameat2 = lambda a, b, flags: False if flags == t._RENAME_EXCHANGE else plain(a, b, flags)
if how == "save":  # save_pretrained's write
    cfg = OPTConfig.from_pretrained(src)
    state, _ = load_numpy_state_dict(src, cfg, "causal_lm")
    save_checkpoint(dst, {k: v * np.float32(scale) for k, v in state.items()}, cfg, "causal_lm", max_shard_size=shard)
else:  # a conversion with overwrite=True
    from conversion import convert
    convert(src, dst, to=how, dtype=None if scale == "1" else "fp16", overwrite=True, progress=False)
"""


def _run(how: str, dst: Path, scale: str, shard: str = "5GB", *, exchange: bool = True,
         crash: str | None = None) -> int:
    env = user_env(**({"_OPT_TEST_CRASH_AT": crash} if crash else {}))
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, how, str(BUNDLED), str(dst), scale, shard,
                           "1" if exchange else "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 137), proc.stderr
    return proc.returncode


def _scaled(scale: float) -> dict[str, np.ndarray]:
    state, _ = load_numpy_state_dict(BUNDLED, OPTConfig.from_pretrained(BUNDLED), "causal_lm")
    return {k: v * np.float32(scale) for k, v in state.items()}


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_crash_at_every_step_of_a_folder_swap_leaves_the_old_or_the_new_model(tmp_path, exchange):
    """A conversion replacing its own earlier output: the folders are swapped. At every crash
    point the folder is the complete old or the complete new model (with two renames it is missing
    for the instant between them); `recover` then settles it and removes every temporary folder."""
    old = _scaled(1.0)
    new = {k: v.astype(np.float16) for k, v in old.items()}
    after_swap = ["exchanged"] if exchange else ["moved-old", "moved-new"]
    for step in ["begin", "journal", *after_swap, "deleted-old"]:
        case = tmp_path / step
        case.mkdir()
        dst = case / "out"
        _run("bin", dst, "1")
        look = plant_lookalike(case)
        assert _run("safetensors", dst, "2", exchange=exchange, crash=step) == 137, step
        if dst.exists():
            got = weights(dst)
            assert same_model(got, old) or same_model(got, new), step
        else:
            assert step == "moved-old"  # the one instant of the two-rename swap
        recover(dst)
        swapped = step in (*after_swap, "deleted-old")
        assert same_model(weights(dst), new if swapped else old), step
        assert (dst / ("model.safetensors" if swapped else "pytorch_model.bin")).is_file(), step
        assert hidden(case) == [look.name], (step, hidden(case))
        assert (look / "draft.txt").read_text() == "not a temporary folder"
        assert MANIFEST_NAME in os.listdir(dst) and ".opt-transaction" not in os.listdir(dst)


def test_a_crash_at_every_step_of_a_per_file_swap_is_finished_by_recover(tmp_path):
    """A destination shared with the user's files: entries move one by one after a journal, and
    `recover` rolls any interrupted swap forward (the new files were complete before it began)."""
    old, new = _scaled(1.0), _scaled(2.0)
    probe = tmp_path / "probe"
    _run("save", probe / "out", "1")
    (probe / "out" / "notes.txt").write_text("mine")
    _run("save", probe / "out", "2", "4MB")
    n_new = len(read_manifest(probe / "out")) + 1  # the new entries, then the manifest
    steps = ["begin", "files-journal", *(f"moved-old-{i}" for i in range(3)), *(f"moved-new-{i}" for i in range(n_new)),
             "deleted-tmp"]
    for step in steps:
        case = tmp_path / step
        case.mkdir()
        dst = case / "out"
        _run("save", dst, "1")
        plant_user_files(dst, blocking=False)
        users = {k: v for k, v in snapshot(dst).items() if "notes" in k or "keep" in k}
        assert _run("save", dst, "2", "4MB", crash=step) == 137, step
        recover(dst)
        assert same_model(weights(dst), old if step == "begin" else new), step
        assert {k: v for k, v in snapshot(dst).items() if k in users} == users, step
        assert hidden(case) == [], (step, hidden(case))


def test_a_folder_created_while_converting_is_not_replaced(tmp_path, monkeypatch):
    import importlib

    convert_module = importlib.import_module("conversion.convert")  # the module, not the function
    dst = tmp_path / "out"
    real = convert_module.write_side_files

    def user_creates_dst(*args, **kwargs):
        dst.mkdir()
        (dst / "mine.txt").write_text("created meanwhile")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_side_files", user_creates_dst)
    with pytest.raises(FileExistsError, match="created by someone else") as e:
        convert_module.convert(BUNDLED, dst, to="safetensors", progress=False)
    assert snapshot(dst) == {"mine.txt": b"created meanwhile"}
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and str(kept[0]) in str(e.value)
    assert same_model(weights(kept[0]), _scaled(1.0)) and hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("existed", [True, False], ids=["replacing", "new"])
def test_what_appears_in_the_destination_during_the_swap_is_never_moved_away(tmp_path, monkeypatch, exchange,
                                                                              existed):
    import opt_core.transaction as t

    dst = tmp_path / "out"
    if existed:
        with WriteTransaction(dst) as tx:
            (tx.path / "config.json").write_text("old")
            tx.commit()
    if not exchange:
        plain = t._renameat2
        monkeypatch.setattr(t, "_renameat2", lambda a, b, flags: False if flags == t._RENAME_EXCHANGE
                            else plain(a, b, flags))

    def user_writes(step: str) -> None:  # right after the last check, before the renames
        if step == "journal":
            dst.mkdir(exist_ok=True)
            (dst / "late.txt").write_text("mine")

    monkeypatch.setattr(t, "_crash_point", user_writes)
    tx = WriteTransaction(dst, overwrite=True).begin()
    (tx.path / "config.json").write_text("new")
    with pytest.raises(FileExistsError, match="left as it is") as e:
        tx.commit()
    tx.abort()
    expected = {"late.txt": b"mine"} | ({"config.json": b"old", MANIFEST_NAME: None} if existed else {})
    got = snapshot(dst)
    assert got.keys() == expected.keys() and all(got[k] == v for k, v in expected.items() if v is not None)
    assert (tx.kept / "config.json").read_text() == "new" and str(tx.kept) in str(e.value)
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------- the commands
def test_the_issues_user_files_survive_every_command(tmp_path):
    dst = tmp_path / "out"
    plant_user_files(dst)
    look = plant_lookalike(tmp_path)
    before, beside = snapshot(dst), snapshot(look)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50)
    for argv in (["convert", "bundled", dst, "--to", "safetensors", "--overwrite"],
                 ["convert", "bundled", dst, "--to", "bin"],
                 ["train", "--corpus", corpus, "--out", dst, "--overwrite", "--steps", "1"],
                 ["train", "--corpus", corpus, "--out", dst, "--init", "bundled", "--steps", "1"],
                 ["verify", "bundled", "--json", dst / "config.json", "--force"],
                 ["verify", "bundled", "--markdown", dst / "model-notes-of-2024.safetensors"]):
        proc = opt(*argv)
        err = one_line_error(proc, 2, argv[0])
        assert "data:" not in proc.stdout, argv  # refused before any work
        assert snapshot(dst) == before and snapshot(look) == beside, (argv, err)
    err = one_line_error(opt("convert", "bundled", dst, "--to", "safetensors", "--overwrite"), 2, "convert")
    assert "(checkpoint-keep/, config.json/, model-notes-of-2024.safetensors, vocab.json/)" in err
    assert hidden(tmp_path) == [TEMP_LOOKALIKE]


def test_output_folders_are_validated_before_any_work(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["train", "--corpus", corpus, "--out", "/proc/opt-x"], "cannot write"),
        (["convert", "bundled", "/proc/opt-x", "--to", "bin"], "cannot write"),
        (["convert", "bundled", "/proc", "--to", "bin", "--overwrite"], "is a mount point"),
        (["train", "--corpus", corpus, "--out", a_file], "not a folder"),
        (["train", "--corpus", corpus, "--out", a_file / "sub"], "not a folder"),
        (["train", "--corpus", corpus, "--out", BUNDLED / "more"], "installed package"),
        (["train", "--corpus", corpus, "--out", tmp_path], "holds the input"),
        (["verify", "bundled", "--json", tmp_path], "not a regular file"),
        (["verify", "bundled", "--json", tmp_path / "missing-folder" / "r.json"], "does not exist"),
    ]
    for argv, expected in cases:
        t0 = time.perf_counter()
        proc = opt(*argv)
        err = one_line_error(proc, 2, argv[0])
        assert expected in err and "data:" not in proc.stdout, (argv, err)
        assert time.perf_counter() - t0 < 60
    assert not (BUNDLED / "more").exists() and hidden(tmp_path) == []


@pytest.mark.torch
def test_verify_report_files_refuse_to_replace_unless_forced(tiny_model_dir, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("my own file")
    err = one_line_error(opt("verify", tiny_model_dir, "--json", report, "--backends", "torch"), 2, "verify")
    assert "already exists; pass --force" in err and report.read_text() == "my own file"
    err = one_line_error(opt("verify", tiny_model_dir, "--json", tiny_model_dir / "config.json", "--force",
                             "--backends", "torch"), 2, "verify")
    assert "input" in err and json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"] == 32
    assert "--force" in opt("verify", "--help").stdout
    proc = opt("verify", "bundled", "--json", report, "--force", "--backends", "torch", "--no-reference",
               "--new-tokens", "2", "--quiet-progress")
    # one backend and no reference has nothing to compare (exit 1): what matters is the file
    assert proc.returncode in (0, 1) and f"JSON report: {report}" in proc.stdout, proc.stderr
    assert isinstance(json.loads(report.read_text()), dict)
    assert hidden(tmp_path) == []


def test_convert_overwrite_crashed_at_every_step_leaves_old_or_new(tmp_path):
    """`opt convert --overwrite` killed at each step of its swap: the destination is the complete
    old model or the complete new one; the next `opt convert` settles what was left and works."""
    old_model = tmp_path / "old-reference"
    assert opt("convert", "bundled", old_model, "--to", "bin", "--no-progress").returncode == 0
    new_model = tmp_path / "new-reference"
    assert opt("convert", "bundled", new_model, "--to", "safetensors", "--dtype", "fp16",
               "--no-progress").returncode == 0
    old_files, new_files = snapshot(old_model), snapshot(new_model)
    for step in ("begin", "journal", "exchanged", "deleted-old"):
        case = tmp_path / step
        case.mkdir()
        dst = case / "out"
        assert opt("convert", "bundled", dst, "--to", "bin", "--no-progress").returncode == 0
        proc = opt("convert", "bundled", dst, "--to", "safetensors", "--dtype", "fp16", "--no-progress",
                   "--overwrite", _OPT_TEST_CRASH_AT=step)
        assert proc.returncode == 137, (step, proc.stderr)
        assert _without_marker(dst) in (old_files, new_files), step  # a marker is left only after the swap
        proc = opt("convert", "bundled", dst, "--to", "safetensors", "--dtype", "fp16", "--no-progress",
                   "--overwrite")
        assert proc.returncode == 0, proc.stderr
        assert snapshot(dst) == new_files and hidden(case) == [], (step, hidden(case))


def _without_marker(folder: Path) -> dict[str, bytes | None]:
    return {k: v for k, v in snapshot(folder).items() if k != ".opt-transaction"}


TRAIN_ARGS = ("--hidden-size", "16", "--layers", "1", "--heads", "2", "--ffn-dim", "32", "--context", "16",
              "--batch-size", "2", "--eval-every", "0", "--threads", "1", "--vocab-size", "300")


@pytest.mark.torch
def test_train_init_x_out_x_overwrite_interrupted_keeps_the_old_model(tiny_model_dir, tmp_path):
    """`opt train --init X --out X --overwrite`, interrupted by Ctrl-C while preparing or training,
    or killed at each step of the final swap: X holds its complete old model or the complete new one."""
    x = tmp_path / "x"
    proc = opt("train", "--corpus", tiny_model_dir / "text.txt", "--out", x, *TRAIN_ARGS, "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    old = snapshot(x)
    again = ("train", "--corpus", tiny_model_dir / "text.txt", "--init", x, "--out", x, "--overwrite", *TRAIN_ARGS)
    for wait_for in ("data:", "model:", "step 3/"):  # SIGINT at several points of the run
        child = subprocess.Popen(opt_argv(*again, "--steps", "100000", "--log-every", "1"), cwd=ROOT,
                                 env=user_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        seen = ""
        for line in child.stdout:  # type: ignore[union-attr]
            seen += line
            if line.startswith(wait_for):
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
        assert child.returncode == 130, (wait_for, err)
        assert snapshot(x) == old, wait_for
        assert hidden(tmp_path) == [], (wait_for, hidden(tmp_path))
    for step in ("journal", "exchanged", "deleted-old"):
        proc = opt(*again, "--steps", "2", _OPT_TEST_CRASH_AT=step)
        assert proc.returncode == 137, (step, proc.stderr)
        if step == "journal":  # killed before the swap: the old model
            assert snapshot(x) == old
        else:  # killed after: the complete new model (and a marker recover() removes)
            assert _without_marker(x) != old and (x / "training_summary.json").is_file() and weights(x), step
        recover(x)
        state = weights(x)
        assert state and hidden(tmp_path) == [], (step, hidden(tmp_path))
        assert set(read_manifest(x)) >= {"config.json", "model.safetensors", "vocab.json", "training_summary.json"}
        old = snapshot(x)
    assert opt(*again, "--steps", "1").returncode == 0 and hidden(tmp_path) == []
