"""The per-CPU matmul kernel of opt_torch (`opt_torch.kernels`): every kernel the load can choose gives
the float64 reference's logits within the float32 tolerance, the same greedy tokens, the checkpoint's
own state_dict, and a model that still trains (a gradient takes F.linear, whatever was chosen)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opt_core import Head
from opt_torch import OPTForCausalLM, kernels
from opt_torch.layout import Linear
from tests.torch.helpers import model_and_reference
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.torch

KERNELS = [k for k in kernels.LINEAR_KERNELS if k != "onednn" or kernels.onednn_available()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear(dtype, bias):
    if not kernels.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    w = torch.randn(48, 32).to(dtype)
    b = torch.randn(48).to(dtype) if bias else None
    x = torch.randn(3, 5, 32).to(dtype)  # [B, T, in]: any leading dims
    with torch.inference_mode():
        got = kernels.linear(x, w, b, "onednn")
        want = F.linear(x, w, b)
    assert got.shape == want.shape == (3, 5, 48) and got.dtype == dtype
    scale = want.float().abs().max()
    limit = 1e-6 if dtype == torch.float32 else 1e-2  # summation order; bf16 rounds the output
    assert (got.float() - want.float()).abs().max() / scale < limit


def test_linear_records_gradients_through_f_linear():
    """With autograd on, "onednn" is F.linear: the backward pass is PyTorch's own."""
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4)
    y = kernels.linear(x, w, None, "onednn")
    y.sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand(8, 4))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_matches_the_reference(kernel, tmp_path, monkeypatch):
    config = VARIANTS["post_ln_proj"]  # project_in/out and lm_head too
    model, ref = model_and_reference(config, Head.CAUSAL_LM)
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("OPT_TORCH_LINEAR", kernel)
    loaded = OPTForCausalLM.from_pretrained(tmp_path, dtype="float32")
    linears = [m for m in loaded.modules() if isinstance(m, Linear)]
    assert {m.kernel for m in linears} == {"aten" if kernel.startswith("aten") else "onednn"}
    packed = {name for name, m in loaded.named_modules() if isinstance(m, Linear) and m.packed}
    layer_linears = {name for name, m in loaded.named_modules() if isinstance(m, Linear) and ".layers." in name}
    projections = {"model.decoder.project_in", "model.decoder.project_out"}
    assert packed == (layer_linears | projections if kernel == "onednn_packed" else set())
    assert not loaded.lm_head.packed
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight  # still one tied copy
    saved = model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())  # values, not layout

    ids, mask = left_padded_batch(config.vocab_size)
    with torch.inference_mode():
        logits = loaded(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        tokens = loaded.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=6, do_sample=False)
        want_tokens = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                     max_new_tokens=6, do_sample=False)
    assert relative_error(logits, ref(ids, mask).logits, mask) < TOLERANCE["float32"]
    assert torch.equal(tokens, want_tokens)

    loaded.train()  # the same model fine-tunes: ordinary parameters again, autograd through F.linear
    assert not any(m.packed for m in linears)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    loss = loaded(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  labels=torch.from_numpy(np.where(mask == 1, ids, -100))).loss
    loss.backward()
    assert loaded.model.decoder.layers[0].fc1.weight.grad is not None


def test_packed_weights_move_and_reload_as_plain_tensors(tmp_path, monkeypatch):
    config = VARIANTS["pre_ln"]
    model, _ref = model_and_reference(config, Head.CAUSAL_LM)
    model.save_pretrained(tmp_path)
    if not kernels.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setenv("OPT_TORCH_LINEAR", "onednn_packed")
    loaded = OPTForCausalLM.from_pretrained(tmp_path)
    fc1 = loaded.model.decoder.layers[0].fc1
    assert fc1.packed and fc1.weight.shape == (config.ffn_dim, config.hidden_size)
    loaded.load_state_dict(model.state_dict())  # loading into a packed model unpacks it
    assert not fc1.packed and torch.equal(fc1.weight, model.model.decoder.layers[0].fc1.weight)
    loaded.pack_weights()
    half = loaded.to(torch.bfloat16)  # dtype moves act on the plain tensors
    assert not fc1.packed and half.model.decoder.layers[0].fc1.weight.dtype == torch.bfloat16


def test_timing_never_packs(monkeypatch):
    """Whether a loaded model's weights are ordinary tensors must not depend on a measurement."""
    monkeypatch.delenv("OPT_TORCH_LINEAR", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        assert kernels.choose_linear(32, 64, dtype) in ("aten", "aten_input_major", "onednn")


def test_forcing_an_unknown_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv("OPT_TORCH_LINEAR", "fastest")
    with pytest.raises(ValueError, match="OPT_TORCH_LINEAR='fastest'; expected one of"):
        kernels.choose_linear(32, 64, torch.float32)


def test_optimize_layout_rejects_what_cannot_run():
    model = OPTForCausalLM(VARIANTS["pre_ln"])
    with pytest.raises(ValueError, match="kernel='mkl'"):
        model.optimize_layout(kernel="mkl")
    with pytest.raises(ValueError, match="input_major=False"):
        model.optimize_layout(kernel="onednn", input_major=True)
