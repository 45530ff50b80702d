"""What only the Flax models have: Hugging Face's Flax golden runs, bfloat16 parameters, the static
StaticCache, remat and the dropout switch. The tests every backend passes are tests/common/."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opt_core.params import Head
from opt_flax import OPTForCausalLM, StaticCache, init_cache
from tests.flax.helpers import REFERENCE, golden_model, write_random_checkpoint
from tests.golden import hf_golden
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.flax


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
    cache = init_cache(model.config, ids.shape[0], ids.shape[1])
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache)
    steps = [np.asarray(out.logits)]
    cache = out.past_key_values
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
        cache = out.past_key_values
        steps.append(np.asarray(out.logits))
    assert int(cache.length) == ids.shape[1]
    assert relative_error(np.concatenate(steps, axis=1), full, mask) < TOLERANCE["float32"]


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
    assert isinstance(init_cache(model.config, 1, 4), StaticCache)
