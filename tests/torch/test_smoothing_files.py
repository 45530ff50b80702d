"""SmoothQuant factor files are checked before use (shape, finite, positive, within the calibration
clamp, bound to the weights' and the text's sha256) and named in every error; calibration results go
to the user's cache folder, never into the model folder or the installed package."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from opt_core import bundled
from opt_core.user_cache import user_cache_dir
from opt_torch import OPTForCausalLM
from opt_torch.smoothquant import (
    SMOOTHING_FILE,
    SMOOTHING_RANGE,
    load_smoothing,
    save_smoothing,
    smoothing_cache_path,
    text_sha256,
    weights_sha256,
)
from tests.conftest import CORPUS_DIR

pytestmark = pytest.mark.torch

IDS = torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700]])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache folder for this module (OPT_CACHE), restored afterwards."""
    old = os.environ.get("OPT_CACHE")
    os.environ["OPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield user_cache_dir()
    if old is None:
        del os.environ["OPT_CACHE"]
    else:
        os.environ["OPT_CACHE"] = old


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "bundled"
    shutil.copytree(bundled.path(), folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text((CORPUS_DIR / "tinyshakespeare.txt").read_text()[:6_000])
    return path


@pytest.fixture(scope="module")
def calibrated(cache, model_dir, text):
    """Calibrate once: (the cache file, its factors, its metadata, the smoothed logits)."""
    before = sorted(os.listdir(model_dir))
    model = OPTForCausalLM.from_pretrained(model_dir, quantize="w8a8", calibration=text)
    assert model.quantization["smoothed"]
    assert sorted(os.listdir(model_dir)) == before  # nothing written into the model folder
    path = smoothing_cache_path(weights_sha256(model_dir), text_sha256(text), 0.5)
    assert path.parent == cache / "smoothquant" and path.is_file()
    factors, meta = load_smoothing(path)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return path, factors, meta, logits


def test_calibration_goes_to_the_cache_and_is_reused(calibrated, model_dir, text):
    path, factors, meta, logits = calibrated
    assert meta["weights_sha256"] == weights_sha256(model_dir) and meta["calibration_sha256"] == text_sha256(text)
    mtime = path.stat().st_mtime_ns
    again = OPTForCausalLM.from_pretrained(model_dir, quantize="w8a8", calibration=text)
    assert path.stat().st_mtime_ns == mtime  # read, not recalibrated
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, logits, rtol=0, atol=0)


def test_the_bundled_package_folder_is_never_written(cache, text):
    package = bundled.path()
    before = {p: p.stat().st_mtime_ns for p in package.iterdir()}
    OPTForCausalLM.from_pretrained(package, quantize="w8a8", calibration=text)
    assert {p: p.stat().st_mtime_ns for p in package.iterdir()} == before
    assert not (package / SMOOTHING_FILE).exists()


def tamper(calibrated, dst, edit=None, meta_edit=None):
    path, factors, meta, _ = calibrated
    factors = {k: v.clone() for k, v in factors.items()}
    meta = dict(meta)
    if edit is not None:
        edit(factors)
    if meta_edit is not None:
        meta_edit(meta)
    save_smoothing(dst, factors, meta)


def first_group(factors):
    return next(k for k in factors if k.endswith(".fc1"))


@pytest.mark.parametrize("case, message", [
    ("huge", r"tensor .*layers\.0\.fc1 holds 1e\+30 at channel 3; factors must be finite and within \[1e-05, 100000\]"),
    ("nan", r"tensor .*layers\.0\.fc1 holds nan at channel 3"),
    ("negative", r"tensor .*layers\.0\.fc1 holds -2 at channel 3"),
    ("zero", r"tensor .*layers\.0\.fc1 holds 0 at channel 3"),
    ("shape", r"tensor .*layers\.0\.fc1 is float32 \[5\]; expected float32 \[\d+\]"),
    ("dtype", r"tensor .*layers\.0\.fc1 is float64 \[\d+\]; expected float32"),
    ("missing", r"do not fit this model: no tensor .*layers\.0\.fc1 \(0 unexpected, 1 missing\)"),
    ("extra", r"do not fit this model: unexpected tensor layers\.99\.fc1 \(1 unexpected, 0 missing\)"),
])
def test_tampered_cached_factors_are_refused_naming_file_and_tensor(calibrated, model_dir, text, case, message):
    path = calibrated[0]
    original = path.read_bytes()

    def edit(f):
        g = first_group(f)
        if case in ("huge", "nan", "negative", "zero"):
            f[g][3] = {"huge": 1e30, "nan": float("nan"), "negative": -2.0, "zero": 0.0}[case]
        elif case == "shape":
            f[g] = f[g][:5]
        elif case == "missing":
            del f[g]
        elif case == "extra":
            f["layers.99.fc1"] = torch.ones(4)

    try:
        if case == "dtype":
            from safetensors.torch import save_file

            factors, meta = load_smoothing(path)
            factors = {k: (v.double() if k == first_group(factors) else v) for k, v in factors.items()}
            save_file(factors, str(path), metadata={k: __import__("json").dumps(v) for k, v in meta.items()})
        else:
            tamper(calibrated, path, edit)
        with pytest.raises(ValueError, match=message) as e:
            OPTForCausalLM.from_pretrained(model_dir, quantize="w8a8", calibration=text)
        assert str(e.value).startswith(f"SmoothQuant factors {path}")
        assert "\n" not in str(e.value)
    finally:
        path.write_bytes(original)


def test_the_bound_is_the_calibration_clamp(calibrated):
    _, factors, _, _ = calibrated
    lo, hi = SMOOTHING_RANGE
    every = torch.cat(list(factors.values()))
    assert bool(((every >= lo) & (every <= hi)).all())


def test_factors_beside_the_weights_are_bound_to_those_weights(calibrated, model_dir, tmp_path):
    # Shipped with the model they were calibrated for: used without a calibration text.
    shipped = tmp_path / "shipped"
    shutil.copytree(model_dir, shipped)
    tamper(calibrated, shipped / SMOOTHING_FILE)
    model = OPTForCausalLM.from_pretrained(shipped, quantize="w8a8")
    assert model.quantization["smoothed"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, calibrated[3], rtol=0, atol=0)
    # The same file beside other weights: refused, not applied.
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    changed = OPTForCausalLM.from_pretrained(other)
    with torch.no_grad():
        changed.get_decoder().layers[0].fc1.weight.mul_(1.01)
    changed.save_pretrained(other)
    tamper(calibrated, other / SMOOTHING_FILE)
    with pytest.raises(ValueError, match=r"SmoothQuant factors .*smoothquant.safetensors were calibrated for other "
                                         r"weights \(weights_sha256 "):
        OPTForCausalLM.from_pretrained(other, quantize="w8a8")
    # Without the binding (an older or hand-written file): refused, saying what to do.
    tamper(calibrated, other / SMOOTHING_FILE, meta_edit=lambda m: m.pop("weights_sha256"))
    with pytest.raises(ValueError, match=r"lack weights_sha256 in their metadata .* delete the file"):
        OPTForCausalLM.from_pretrained(other, quantize="w8a8")
    # Tampered beside the weights: refused like in the cache.
    tamper(calibrated, shipped / SMOOTHING_FILE, lambda f: f[first_group(f)].fill_(1e30))
    with pytest.raises(ValueError, match=r"holds 1e\+30 at channel 0"):
        OPTForCausalLM.from_pretrained(shipped, quantize="w8a8")
    (shipped / SMOOTHING_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match=r"smoothquant.safetensors are not a readable safetensors file"):
        OPTForCausalLM.from_pretrained(shipped, quantize="w8a8")


@pytest.mark.parametrize("kind, message", [
    ("folder", r"calibration text .* is a folder, not a text file"),
    ("fifo", r"calibration text .*fifo is a FIFO \(named pipe\), not a text file"),
    ("device", r"calibration text /dev/null is a device, not a text file"),
    ("missing", r"calibration text .*nope.txt does not exist"),
    ("empty", r"calibration text .*empty.txt is empty"),
    ("binary", r"calibration text .*binary.txt holds a NUL byte at offset 4: a binary file"),
])
def test_odd_calibration_paths_are_named_by_kind(cache, model_dir, tmp_path, kind, message):
    path = {"folder": tmp_path, "fifo": tmp_path / "fifo", "device": "/dev/null", "missing": tmp_path / "nope.txt",
            "empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "empty":
        path.write_bytes(b"")
    if kind == "binary":
        path.write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    with pytest.raises((ValueError, FileNotFoundError, IsADirectoryError), match=message):
        OPTForCausalLM.from_pretrained(model_dir, quantize="w8a8", calibration=path)


def test_calibration_reads_only_what_it_uses(cache, model_dir, tmp_path):
    """A large calibration text: only its first 2,048 tokens are read and tokenized (bounded time)."""
    import time

    big = tmp_path / "big.txt"
    line = "Now is the winter of our discontent made glorious summer by this sun of York.\n"
    with open(big, "w") as f:
        f.write(line * (60_000_000 // len(line)))
    t0 = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(model_dir, quantize="w8a8", calibration=big)
    assert model.quantization["smoothed"]
    assert time.perf_counter() - t0 < 60  # tokenizing 60 MB whole takes minutes and gigabytes
    assert np.isfinite(model(input_ids=IDS).logits.detach().numpy()).all()
