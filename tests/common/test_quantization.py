"""`quantize="w8a8"` in every backend is what `opt_core.quantization.W8A8` says it is: the same
matmuls swapped and per-channel int8 weights everywhere; TF's and Flax's int8 product is the NumPy
definition `w8a8_linear` (per-token symmetric activations); torch's token table is int8 and TF's
and Flax's stays float (README.md, "quantize= in each backend", measures what the difference costs)."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import OPTConfig
from opt_core.quantization import W8A8, quantize_per_channel, quantize_per_token, w8a8_linear
from tests.backends import BACKENDS, get_backend

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]

CONFIG = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                   max_position_embeddings=32, word_embed_proj_dim=16, tie_word_embeddings=False)


def test_the_numpy_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 32)).astype(np.float32)
    x[2] = 0.0
    x[3, 7] = 40.0  # an outlier widens only its own token's scale
    q, scale = quantize_per_token(x)
    assert q.dtype == np.int8 and scale.shape == (5, 1) and not q[2].any()
    assert bool((np.abs(q * scale - x) <= scale / 2 + 1e-6).all())  # round to nearest
    assert scale[3, 0] > 10 * scale[0, 0] and scale[3, 0] == pytest.approx(40.0 / 127)
    kernel = rng.normal(size=(32, 8)).astype(np.float32)
    y = w8a8_linear(x, kernel, None)
    exact = x @ kernel
    assert np.abs(y - exact).max() < 0.05 * np.abs(exact).max()


def _tf_quantized_linears(model):
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attn = layer.self_attn
        yield from (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2)
    yield decoder.project_in
    yield decoder.project_out
    yield model.lm_head


def test_every_backend_swaps_the_matmuls_its_scheme_names():
    """All of W8A8[b].layers become int8 in every backend (torch fuses q/k/v into one int8 matmul);
    the token table follows W8A8[b].embeddings."""
    assert {s.layers for s in W8A8.values()} == {W8A8["torch"].layers}
    assert {s.weights for s in W8A8.values()} == {W8A8["torch"].weights}
    for name in BACKENDS:
        b = get_backend(name)
        Q = b.module("quantize")
        ids = np.random.default_rng(2).integers(4, CONFIG.vocab_size, (2, 7))
        want = b.forward(b.build(CONFIG), ids)["logits"]
        model = Q.quantize_model(b.build(CONFIG), "w8a8")
        got = b.forward(model, ids)["logits"]  # the swapped model still runs, untied head included
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max(), name
        decoder = model.get_decoder()
        if name == "torch":
            swapped = [m for layer in decoder.layers
                       for m in (layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.fc1, layer.fc2)]
            swapped += [decoder.project_in, decoder.project_out, model.lm_head]
            assert all(isinstance(m, Q.DynamicInt8Linear) for m in swapped), [type(m).__name__ for m in swapped]
            assert isinstance(decoder.embed_tokens, Q.Int8Embedding)
            assert W8A8[name].embeddings.startswith("int8 rows")
        else:
            swapped = list(_tf_quantized_linears(model))
            assert all(isinstance(m, Q.QuantizedLinear) for m in swapped), [type(m).__name__ for m in swapped]
            table = decoder.embed_tokens if name == "tf" else decoder.embed_tokens.embedding[...]
            assert np.asarray(table).dtype == np.float32
            assert W8A8[name].embeddings.startswith("kept in the model's float dtype")


@pytest.mark.parametrize("name", ["tf", "flax"])
def test_xla_backends_compute_the_numpy_definition(name):
    """TF's and Flax's QuantizedLinear give `w8a8_linear` (an exact int32 dot, then float32
    rescaling: equal to float32 rounding)."""
    b = get_backend(name)
    Q = b.module("quantize")
    model = b.build(CONFIG)
    linear = model.get_decoder().layers[0].fc1
    kernel = np.asarray(linear.kernel.numpy() if name == "tf" else linear.kernel[...])
    bias = np.asarray(linear.bias.numpy() if name == "tf" else linear.bias[...])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 32)).astype(np.float32)
    x[0, 1, 5] = 30.0  # an outlier token
    got = b.to_numpy(Q.QuantizedLinear(linear, "w8a8")(b.tensor(x)))
    want = w8a8_linear(x.reshape(-1, 32), kernel, bias).reshape(2, 3, -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    q, scale = quantize_per_channel(kernel)
    assert np.abs(q.astype(np.float32) * scale - kernel).max() <= scale.max() / 2 + 1e-7
