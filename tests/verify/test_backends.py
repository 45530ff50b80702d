"""`opt verify` on the real backends, with checkpoints written by Hugging Face 4.57.6."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from opt_verify import format_table, verify
from tests.golden import golden_checkpoint

BACKEND_PARAMS = [
    pytest.param("torch", marks=pytest.mark.torch),
    pytest.param("tf", marks=pytest.mark.tf),
    pytest.param("flax", marks=pytest.mark.flax),
]


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backend_matches_reference(backend):
    report = verify(golden_checkpoint("pre_ln"), backends=(backend,), new_tokens=16)
    assert report.passed, format_table(report)
    (pair,) = report.pairs
    assert (pair.a, pair.b) == ("reference", backend)
    assert pair.greedy_first_divergence is None and pair.greedy_compared > 0
    assert len(pair.hidden_rel) == 3 and all(r is not None for r in pair.hidden_rel)


@pytest.mark.oracle
@pytest.mark.torch
@pytest.mark.tf
@pytest.mark.flax
def test_all_backends_in_one_run():
    """What `opt verify` does by default: the three frameworks in one process, six pairs, on the
    350m-like variant (post-LN, project_in/out: the last hidden state is E-wide, not C-wide)."""
    report = verify(golden_checkpoint("post_ln_proj"), new_tokens=16)
    assert report.passed, format_table(report)
    assert [(p.a, p.b) for p in report.pairs] == [
        ("reference", "torch"), ("reference", "tf"), ("reference", "flax"),
        ("torch", "tf"), ("torch", "flax"), ("tf", "flax"),
    ]
    for p in report.pairs:
        assert p.greedy_matched == p.greedy_compared > 0
        assert len(p.hidden_rel) == 3 and all(r is not None for r in p.hidden_rel)


def _corrupt_torch_bin(folder: Path, key: str) -> None:
    import torch

    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    w = state[key]
    state[key] = w + 0.05 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    torch.save(state, path)


@pytest.mark.oracle
@pytest.mark.torch
@pytest.mark.flax
def test_corrupted_format_is_caught(tmp_path):
    """A folder whose torch weights (pytorch_model.bin) were corrupted in layer 1 while its Flax
    weights (flax_model.msgpack) are intact: each backend reads its own format first (as Hugging
    Face's loaders do; the reference reads the .bin like torch), so flax disagrees with both from
    layer 1 on while torch and the reference agree."""
    src = golden_checkpoint("pre_ln")
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").unlink()  # every backend would prefer it
    _corrupt_torch_bin(folder, "model.decoder.layers.1.fc1.weight")
    report = verify(folder, backends=("torch", "flax"), new_tokens=8)
    assert not report.passed
    assert [(r.name, r.status) for r in report.backends] == [("reference", "ok"), ("torch", "ok"), ("flax", "ok")]
    pairs = {(p.a, p.b): p for p in report.pairs}
    assert pairs[("reference", "torch")].passed, format_table(report)
    assert not pairs[("reference", "flax")].passed
    pair = pairs[("torch", "flax")]
    assert pair.first_divergent_layer == "layer 1", format_table(report)
    assert pair.hidden_rel[0] < 1e-6 and pair.hidden_rel[1] < 1e-6
    assert not np.isfinite(pair.logits_rel) or pair.logits_rel > 1e-3
    assert "layer 1" in format_table(report)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_report_names_what_changes_the_numbers(dtype, monkeypatch):
    """The quantization (mode, kernel, activations) and the matmul kernel are in the report, so
    two reports with different numbers say why."""
    from opt_core import bundled

    report = verify(bundled.path(), backends=("torch",), dtype=dtype, quantize="int8", new_tokens=2)
    (torch_result,) = [b for b in report.backends if b.name == "torch"]
    assert "quantize=mode int8" in torch_result.numerics
    assert f"activations {dtype}" in torch_result.numerics
    assert torch_result.numerics in format_table(report)
    if dtype == "float32":  # a float model: its layers' kernel, ATen unless another is asked for
        monkeypatch.delenv("OPT_TORCH_LINEAR", raising=False)
        report = verify(bundled.path(), backends=("torch",), dtype=dtype, new_tokens=2)
        (torch_result,) = [b for b in report.backends if b.name == "torch"]
        assert torch_result.numerics == "matmul kernel aten"
