"""What only the opt_torch models have: state_dict names, eager attention (SDPA, the default, runs in
tests/common/), flash attention, float16/bfloat16 activations, attention weights, fused q/k/v, the
weight layout, gradient checkpointing and the training switches. The tests every backend passes
(reference, hidden states, losses, input errors) are tests/common/."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt_core import Head
from opt_core.params import hf_name, parameter_table
from opt_torch import OPTForCausalLM, OPTModel
from opt_torch.modeling import MODEL_CLASSES
from tests.torch.helpers import HEAD_OUTPUT, compare_mask, model_and_reference
from tests.variants import CORE_VARIANTS, TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.torch

HEADS = list(Head)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.value)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_keys_are_hugging_face_names(variant, head):
    config = VARIANTS[variant]
    model = MODEL_CLASSES[head](config)
    expected = [hf_name(s.name, head) for s in parameter_table(config, head)]
    assert list(model.state_dict()) == expected
    for spec in parameter_table(config, head):
        assert tuple(model.state_dict()[hf_name(spec.name, head)].shape) == spec.shape


# SDPA, the default, runs in tests/common/test_modeling.py::test_matches_float64_reference.
@pytest.mark.parametrize("attn", ["eager"])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.value)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_matches_reference(variant, head, attn):
    config = VARIANTS[variant]
    model, ref = model_and_reference(config, head, attn)
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    expected = ref(ids, mask)
    field = HEAD_OUTPUT[head]
    err = relative_error(getattr(out, field).numpy(), getattr(expected, field), compare_mask(head, mask))
    assert err < TOLERANCE["float32"], f"{variant}/{head.value}/{attn}: {err:.2e}"
    if head is Head.QUESTION_ANSWERING:
        assert relative_error(out.end_logits.numpy(), expected.end_logits, mask) < TOLERANCE["float32"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_reduced_precision_within_documented_bound(variant, attn, dtype):
    config = VARIANTS[variant]
    model, ref = model_and_reference(config, Head.CAUSAL_LM, attn)
    model = model.to(getattr(torch, dtype))
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = out.logits.float().numpy()
    # Left padding in half precision: no NaN anywhere, padded positions included.
    assert np.isfinite(logits).all()
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    err = relative_error(logits, ref(ids, mask).logits, mask)
    assert err < TOLERANCE[dtype], f"{variant}/{attn}/{dtype}: {err:.2e}"


def test_fully_masked_row_is_finite():
    config = VARIANTS["pre_ln"]
    ids, mask = left_padded_batch(config.vocab_size)
    mask = mask.copy()
    mask[1] = 0  # a row of padding only
    for attn in ("eager", "sdpa"):
        model, _ = model_and_reference(config, Head.CAUSAL_LM, attn)
        model = model.half()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=attn == "eager")
        assert torch.isfinite(out.logits).all(), attn


def test_eager_returns_attention_weights():
    config = VARIANTS["pre_ln"]
    ids, mask = left_padded_batch(config.vocab_size)
    model, _ = model_and_reference(config, Head.BASE, "eager")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers
    w = out.attentions[0]
    assert w.shape == (3, config.num_attention_heads, ids.shape[1], ids.shape[1])
    real = torch.from_numpy(mask).bool()
    sums = w.sum(-1)  # [B, H, T]
    assert torch.allclose(sums[real[:, None, :].expand_as(sums)], torch.ones(()), atol=1e-5)
    above = ~torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()  # [T, S]
    future = above[None, None] & real[:, None, :, None]  # real queries looking ahead
    assert (w[future.expand_as(w)] == 0).all()


def test_outputs_accept_numpy_and_torch_alike():
    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    assert torch.equal(a, b)
    assert a.shape == (3, ids.shape[1], config.vocab_size)


# ---------------------------------------------------------------- losses
# ---------------------------------------------------------------- training switches
def test_gradient_checkpointing_gives_the_same_gradients():
    config = VARIANTS["post_ln_proj"].replace(dropout=0.0)
    ids, mask = left_padded_batch(config.vocab_size)
    labels = np.where(mask == 1, ids, -100)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = OPTForCausalLM(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_layerdrop_applies_in_training_only():
    config = VARIANTS["pre_ln"].replace(layerdrop=1.0, dropout=0.0)
    ids, mask = left_padded_batch(config.vocab_size)
    model = OPTModel(config)
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        trained = model.train()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # Every layer dropped: the output is the final LayerNorm of the embeddings.
    embeddings = trained.hidden_states[0]
    assert torch.allclose(trained.last_hidden_state, model.decoder.final_layer_norm(embeddings), atol=1e-6)
    assert not torch.allclose(evaluated, trained.last_hidden_state)


def test_dropout_is_off_in_eval_and_on_in_train():
    config = VARIANTS["pre_ln"].replace(dropout=0.5)
    ids, mask = left_padded_batch(config.vocab_size)
    model = OPTForCausalLM(config)
    with torch.no_grad():
        a = model.eval()(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
        c = model.train()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_lm_head_is_tied_and_init_follows_hugging_face():
    config = VARIANTS["pre_ln_proj"]
    model = OPTForCausalLM(config)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.lm_head.weight.shape == (config.vocab_size, config.embed_dim)
    assert (model.model.decoder.embed_tokens.weight[config.pad_token_id] == 0).all()
    assert model.num_parameters() == sum(s.numel for s in parameter_table(config) if s.tied_to is None)
    untied = OPTForCausalLM(config.replace(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.decoder.embed_tokens.weight


# ---------------------------------------------------------------- errors
def test_flash_attention_without_cuda_says_why():
    with pytest.raises(ValueError, match="CUDA"):
        OPTForCausalLM(VARIANTS["pre_ln"], attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="unknown"):
        OPTForCausalLM(VARIANTS["pre_ln"], attn_implementation="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention runs on a CUDA GPU only")
def test_flash_attention_matches_reference_on_gpu():  # exercised whenever a GPU is present
    config = VARIANTS["pre_ln"]
    model, ref = model_and_reference(config, Head.CAUSAL_LM, "sdpa")
    model = model.to("cuda", torch.float16)
    model.set_attn_implementation("flash_attention_2")
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()
    assert relative_error(logits, ref(ids, mask).logits, mask) < TOLERANCE["float16"]


def test_fused_qkv_is_exact_keeps_names_and_trains():
    config = VARIANTS["post_ln_proj"]
    model, ref = model_and_reference(config, Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_qkv()
    attn = model.model.decoder.layers[0].self_attn
    assert attn._fused() is None  # gradients enabled here: the three matmuls run
    with torch.no_grad():
        assert attn._fused() is not None
        after = model(input_ids=ids, attention_mask=mask).logits
    assert relative_error(after.numpy(), before.numpy(), mask) < 1e-6
    assert list(model.state_dict()) == list(state_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_before.items())
    # Training updates the parameters, which are views of the fused buffer.
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=np.where(mask == 1, ids, -100)).loss.backward()
    assert attn.q_proj.weight.grad is not None
    with torch.no_grad():
        attn.q_proj.weight.sub_(attn.q_proj.weight.grad)
        assert torch.equal(attn._fused()[0][: config.hidden_size], attn.q_proj.weight)
    model.eval()
    # Converting drops the fused copy; results stay right.
    model = model.double()
    assert attn._qkv is None
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float64


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_optimize_layout_changes_strides_only(variant):
    """Input-major weights: same names, shapes, values and logits; the lm_head stays tied; training
    still updates the tied and fused parameters; saving writes the canonical layout."""
    config = VARIANTS[variant]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.optimize_layout()
    layer = model.model.decoder.layers[0]
    for w in (layer.fc1.weight, layer.fc2.weight, layer.self_attn.out_proj.weight, layer.self_attn.q_proj.weight,
              model.lm_head.weight):
        assert w.stride() == (1, w.shape[0] if w is not layer.self_attn.q_proj.weight else 3 * w.shape[0])
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    state = model.state_dict()
    assert list(state) == list(state_before)
    assert all(torch.equal(state[k], v) for k, v in state_before.items())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert relative_error(after.numpy(), before.numpy(), mask) < 1e-6
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(input_ids=ids, attention_mask=mask, labels=np.where(mask == 1, ids, -100)).loss.backward()
    grad = model.lm_head.weight.grad.clone()
    opt.step()
    embed_before = state_before["model.decoder.embed_tokens.weight"]
    assert torch.equal(model.model.decoder.embed_tokens.weight, embed_before - grad)
    model.eval()


def _naive_flash(q, k, v, dropout_p, softmax_scale, causal):
    """flash_attn_func's contract on CPU: [B, T, H, D], causal aligned bottom-right."""
    t, s = q.shape[1], k.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * softmax_scale
    if causal:
        allowed = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def _naive_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
    outs = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        outs.append(_naive_flash(qi[None], ki[None], vi[None], dropout_p, softmax_scale, causal)[0])
    return torch.cat(outs)


def test_flash_attention_unpadding_logic_with_cpu_stand_ins(monkeypatch):
    """The flash path's packing of left-padded batches (prefill and cached decoding), run on CPU
    with reference implementations of flash_attn's two kernels in place of the CUDA ones."""
    import opt_torch.attention as attention

    def fake_flash(q, k, v, mask, dropout):
        return attention._flash_attention_packed(q, k, v, mask, dropout, _naive_flash, _naive_flash_varlen)

    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM, "sdpa")
    ids, mask = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
        monkeypatch.setattr(attention, "flash_attention", fake_flash)
        for layer in model.model.decoder.layers:
            layer.self_attn.attn_implementation = "flash_attention_2"
        full = model(input_ids=ids, attention_mask=mask).logits.numpy()
        dense = model(input_ids=ids[:1]).logits.numpy()  # row 0 has no padding: the dense kernel
        out = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits.numpy()]
        for t in range(5, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                        past_key_values=out.past_key_values)
            steps.append(out.logits.numpy())
    assert relative_error(full, expected, mask) < TOLERANCE["float32"]
    assert relative_error(dense, expected[:1], mask[:1]) < TOLERANCE["float32"]
    assert relative_error(np.concatenate(steps, 1), expected, mask) < TOLERANCE["float32"]
