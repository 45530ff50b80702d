"""Generation: greedy and beam tokens equal Hugging Face's; eos, padding, sampling, contrastive."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opt_core import Head
from opt_torch import OPTForCausalLM, generate
from tests.golden import NEW_TOKENS, NUM_BEAMS, hf_golden
from tests.oracle import oracle_run
from tests.torch.helpers import model_and_reference
from tests.variants import VARIANTS

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def golden_models():
    cache = {}

    def get(variant):
        if variant not in cache:
            g = hf_golden(variant)
            cache[variant] = (g, OPTForCausalLM.from_pretrained(g.folder))
        return cache[variant]

    return get


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_and_beam_equal_hugging_face(variant, golden_models):
    g, model = golden_models(variant)
    greedy = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(greedy.numpy(), g.torch["greedy"])
    beam = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS, num_beams=NUM_BEAMS,
                          early_stopping=True, length_penalty=1.0)
    np.testing.assert_array_equal(beam.numpy(), g.torch["beam"])


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_dynamic_cache_generates_the_same(variant, golden_models):
    g, model = golden_models(variant)
    for kwargs, key in (({}, "greedy"), ({"num_beams": NUM_BEAMS, "early_stopping": True}, "beam")):
        out = model.generate(g.ids, attention_mask=g.mask, max_new_tokens=NEW_TOKENS,
                             cache_implementation="dynamic", **kwargs)
        np.testing.assert_array_equal(out.numpy(), g.torch[key])


@pytest.mark.oracle
def test_eos_stops_and_pads_like_hugging_face(golden_models):
    """With an eos id that the model actually produces: finished rows padded, beams finishing early,
    both early_stopping modes, a length penalty and a repetition penalty, all as HF does."""
    g, model = golden_models("post_ln_proj")
    prompt = g.ids.shape[1]
    eos = int(g.torch["greedy"][0, prompt + 3])  # a token row 0 emits greedily at step 4
    runs = [
        {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos},
        {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos, "num_beams": 3, "early_stopping": True},
        {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos, "num_beams": 4, "early_stopping": False,
         "length_penalty": 0.5},
        {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos, "num_beams": 2, "early_stopping": "never",
         "length_penalty": 2.0},
        {"max_new_tokens": 12, "do_sample": False, "repetition_penalty": 1.5},
        {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos, "min_new_tokens": 6},
    ]
    hf = oracle_run(g.folder, [{"framework": "torch", "input_ids": g.ids, "attention_mask": g.mask, "generate": r}
                               for r in runs])
    for run, expected in zip(runs, hf):
        got = model.generate(g.ids, attention_mask=g.mask, **run).numpy()
        np.testing.assert_array_equal(got, expected["sequences"], err_msg=str(run))
    assert (hf[0]["sequences"][0, prompt + 4 :] == model.config.pad_token_id).all()  # row 0 finished


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


def test_sampling_is_reproducible_with_a_seed(small_model):
    model, ids, mask = small_model
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    a = model.generate(ids, seed=1, **kw)
    b = model.generate(ids, seed=1, **kw)
    c = model.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    others = [model.generate(ids, seed=s, **kw) for s in range(2, 6)]
    assert any(not torch.equal(a, o) for o in others)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1, seed=0)
    assert torch.equal(top1, greedy)


def test_contrastive_search(small_model):
    model, ids, mask = small_model
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    # alpha -> 0 ranks candidates by probability alone: greedy decoding.
    tiny = model.generate(ids, attention_mask=mask, max_new_tokens=10, penalty_alpha=1e-9, top_k=4)
    assert torch.equal(tiny, greedy)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, penalty_alpha=0.6, top_k=4)
    assert out.shape == greedy.shape and torch.equal(out[:, : ids.shape[1]], torch.from_numpy(ids))
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=10, penalty_alpha=0.6, top_k=4))
    # The degeneration penalty repeats less than greedy does.
    distinct = lambda x: sum(len(set(r[ids.shape[1]:].tolist())) for r in x)  # noqa: E731
    assert distinct(out) >= distinct(greedy)


def test_streamer_min_new_tokens_and_functional_form(small_model):
    model, ids, mask = small_model
    seen = []
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(seen[0], torch.from_numpy(ids)) and len(seen) == 7
    assert torch.equal(torch.stack(seen[1:], 1), out[:, ids.shape[1]:])
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=6), out)

    first = int(out[0, ids.shape[1]])
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=first)
    assert (stopped[0, ids.shape[1] + 1 :] == model.config.pad_token_id).all()
    held = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=first, min_new_tokens=3)
    assert (held[:, ids.shape[1] : ids.shape[1] + 3] != first).all()


def test_generation_errors(small_model):
    model, ids, mask = small_model
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, attention_mask=mask, max_new_tokens=limit)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[2, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, top_p=1.5)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, num_beams=0)
    assert torch.equal(model.generate(ids, max_new_tokens=0), torch.from_numpy(ids))
