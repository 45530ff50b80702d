"""opt_flax models against the float64 reference and Hugging Face's answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opt_core.params import Head
from opt_flax import KVCache, OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel
from tests.flax.helpers import REFERENCE, golden_model, write_random_checkpoint
from tests.golden import hf_golden
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.flax

CLASSES = {
    Head.BASE: OPTModel,
    Head.CAUSAL_LM: OPTForCausalLM,
    Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassification,
    Head.QUESTION_ANSWERING: OPTForQuestionAnswering,
}
OUTPUTS = {
    Head.BASE: ("last_hidden_state",),
    Head.CAUSAL_LM: ("logits",),
    Head.SEQUENCE_CLASSIFICATION: ("logits",),
    Head.QUESTION_ANSWERING: ("start_logits", "end_logits"),
}


@pytest.mark.parametrize("head", list(Head), ids=lambda h: h.value)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_float64_reference(variant, head, tmp_path):
    params = write_random_checkpoint(tmp_path, variant, head)
    ids, mask = left_padded_batch(VARIANTS[variant].vocab_size)
    ref = REFERENCE[head](VARIANTS[variant], params)(ids, mask)
    out = CLASSES[head].from_pretrained(tmp_path)(ids, attention_mask=mask)
    for field in OUTPUTS[head]:
        got = np.asarray(getattr(out, field))
        assert np.isfinite(got).all(), field
        real = None if head is Head.SEQUENCE_CLASSIFICATION else mask  # pooled logits: one per row
        assert relative_error(got, getattr(ref, field), real) < TOLERANCE["float32"], field


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_hidden_states_match_hf(variant):
    g = hf_golden(variant)
    out = golden_model(variant)(g.ids, attention_mask=g.mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(g.torch["hidden_states"])
    for ours, theirs in zip(out.hidden_states, g.torch["hidden_states"]):
        assert relative_error(ours, theirs, g.mask) < TOLERANCE["float32"]
    assert relative_error(out.logits, g.flax["logits"], g.mask) < TOLERANCE["float32"]


def test_bfloat16_within_bound(tmp_path):
    params = write_random_checkpoint(tmp_path, "post_ln_proj", Head.CAUSAL_LM)
    ids, mask = left_padded_batch()
    ref = REFERENCE[Head.CAUSAL_LM](VARIANTS["post_ln_proj"], params)(ids, mask)
    model = OPTForCausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.model.decoder.layers[0].fc1.kernel[...].dtype == jnp.bfloat16
    assert model.model.decoder.layers[0].final_layer_norm.scale[...].dtype == jnp.float32
    logits = np.asarray(model(ids, attention_mask=mask).logits.astype(jnp.float32))
    assert np.isfinite(logits).all()
    assert relative_error(logits, ref.logits, mask) < TOLERANCE["bfloat16"]


def test_no_nan_with_left_padding_and_empty_rows():
    model = golden_model("pre_ln")
    ids, mask = left_padded_batch()
    ids = np.concatenate([ids, np.ones((1, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.zeros((1, mask.shape[1]), mask.dtype)])  # a row of padding only
    for dtype in (jnp.float32, jnp.bfloat16):
        out = model(ids, attention_mask=mask, output_hidden_states=True) if dtype == jnp.float32 else \
            OPTForCausalLM.from_pretrained(hf_golden("pre_ln").folder, dtype=dtype)(ids, attention_mask=mask)
        assert np.isfinite(np.asarray(out.logits.astype(jnp.float32))).all()


def test_cached_decoding_equals_full_pass():
    model = golden_model("post_ln_proj")
    ids, mask = left_padded_batch()
    full = np.asarray(model(ids, attention_mask=mask).logits)
    prompt = 5
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache)
    steps = [np.asarray(out.logits)]
    cache = out.past_key_values
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    assert int(cache.length) == ids.shape[1]
    assert relative_error(np.concatenate(steps, axis=1), full, mask) < TOLERANCE["float32"]


def test_losses_match_numpy(tmp_path):
    ids, mask = left_padded_batch()
    model = golden_model("pre_ln")
    labels = np.where(mask == 1, ids, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    logits = np.asarray(out.logits, np.float64)[:, :-1]
    target = labels[:, 1:]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    valid = target != -100
    expected = -np.take_along_axis(logp, np.where(valid, target, 0)[..., None], -1)[..., 0][valid].mean()
    assert abs(float(out.loss) - expected) < 1e-5

    write_random_checkpoint(tmp_path, "pre_ln", Head.QUESTION_ANSWERING)
    qa = OPTForQuestionAnswering.from_pretrained(tmp_path)
    out = qa(ids, attention_mask=mask, start_positions=np.array([3, 4, 100]), end_positions=np.array([5, 6, 7]))
    assert np.isfinite(float(out.loss))


def test_sequence_classification_loss_kinds(tmp_path):
    write_random_checkpoint(tmp_path, "pre_ln", Head.SEQUENCE_CLASSIFICATION)
    ids, mask = left_padded_batch()
    model = OPTForSequenceClassification.from_pretrained(tmp_path)
    out = model(ids, attention_mask=mask, labels=np.array([0, 1, 1]))
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert abs(float(out.loss) + logp[np.arange(3), [0, 1, 1]].mean()) < 1e-5
    multi = model(ids, attention_mask=mask, labels=np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert np.isfinite(float(multi.loss))


def test_dropout_switch_and_remat_gradients(tmp_path):
    from flax import nnx

    config = VARIANTS["pre_ln"].replace(dropout=0.5)
    ids, mask = left_padded_batch()
    model = OPTForCausalLM(config, rngs=nnx.Rngs(0))
    a = np.asarray(model(ids, attention_mask=mask).logits)
    b = np.asarray(model(ids, attention_mask=mask, deterministic=False).logits)
    assert not np.allclose(a, b)  # dropout on
    assert np.array_equal(a, np.asarray(model(ids, attention_mask=mask).logits))  # eval by default
    model.train()
    assert not np.array_equal(a, np.asarray(model(ids, attention_mask=mask).logits))
    model.eval()

    def grads(remat: bool) -> list[np.ndarray]:
        m = OPTForCausalLM(VARIANTS["pre_ln"], rngs=nnx.Rngs(0), remat=remat)
        loss = lambda m: m(ids, attention_mask=mask, labels=ids).loss  # noqa: E731
        return [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.grad(loss)(m))]

    for x, y in zip(grads(False), grads(True)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
    model = golden_model("pre_ln")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(np.array([[2, 500]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.full((1, 65), 5))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(np.array([[2, 5]]), attention_mask=np.array([[1, 1, 1]]))
    assert isinstance(model.init_cache(1, 4), KVCache)
