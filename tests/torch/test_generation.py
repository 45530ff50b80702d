"""Torch-only generation checks: the counter-based stream computed in torch is opt_core.sampling's
bit for bit, the KV-cache functions, contrastive search (a torch extra outside the contract), and
greedy / beam tokens equal Hugging Face's on every variant. The contract itself (all backends) is
tested in tests/generation/."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from opt_core import Head, sampling
from opt_torch import OPTForCausalLM, cache, generate
from opt_torch import generation as gen
from tests.golden import NEW_TOKENS, NUM_BEAMS, hf_golden
from tests.torch.helpers import model_and_reference
from tests.variants import VARIANTS

pytestmark = pytest.mark.torch


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_and_beam_equal_hugging_face(variant):
    g = hf_golden(variant)
    model = OPTForCausalLM.from_pretrained(g.folder)
    greedy = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(greedy.numpy(), g.torch["greedy"])
    model.generation_config = dataclasses.replace(model.generation_config, early_stopping=True)
    beam = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, num_beams=NUM_BEAMS,
                          length_penalty=1.0)
    np.testing.assert_array_equal(beam.numpy(), g.torch["beam"])


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**64 - 1])
def test_the_stream_in_torch_is_the_core_stream(seed):
    salt = gen.vocab_salt(5000)
    for step in (0, 3, 2**31):
        r = torch.as_tensor(sampling.row_keys(seed, step, 4).astype(np.int64))
        bits = gen.fmix32(r[:, None] ^ salt[None, :]).numpy()
        np.testing.assert_array_equal(bits, sampling.random_bits(seed, step, 4, 5000).astype(np.int64))
        noise = gen.gumbel_noise(seed, step, 4, salt).numpy()
        np.testing.assert_allclose(noise, sampling.gumbel_noise(seed, step, 4, 5000), rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def small_model():
    config = VARIANTS["pre_ln"]
    model, _ = model_and_reference(config, Head.CAUSAL_LM)
    with torch.no_grad():  # larger weights so that text varies instead of repeating one id
        for p in model.parameters():
            p.mul_(20.0) if p.dim() > 1 else None
    ids = np.array([[1, 1, 2, 40, 41], [2, 50, 51, 52, 53]])
    mask = (ids != 1).astype(np.int64)
    mask[1] = 1
    return model, ids, mask


def test_cache_functions_share_the_backends_names(small_model):
    model, ids, mask = small_model
    kv = cache.init_cache(model.config, 2, 8)
    k = torch.randn(2, model.config.num_attention_heads, 3, model.config.head_dim)
    keys, values = kv.update(0, k, -k)
    assert torch.equal(keys, k) and torch.equal(values, -k) and kv.get_seq_length() == 3
    kv.reorder(torch.tensor([1, 1]))
    assert torch.equal(kv.keys[0][0, :, :3], k[1])


def test_functional_form_equals_the_method(small_model):
    model, ids, mask = small_model
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6), out)
    assert torch.equal(generate(model, torch.from_numpy(ids), torch.from_numpy(mask), max_new_tokens=6), out)


def test_errors_name_the_input(small_model):
    model, ids, mask = small_model
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[2, 999]], max_new_tokens=2)
    with pytest.raises(TypeError):
        model.generate(ids, generator=torch.Generator())  # no backend-only keywords
