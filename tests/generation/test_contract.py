"""The generation contract (issue 13's table) as a test, run once per backend: one signature and
docstring, int64 results, fresh randomness without a seed, the same seed giving the NumPy
reference's tokens, one meaning of eos None / [] / list, max_new_tokens=0, one validation (the
very error text of opt_core's resolver), streamers, and generation_config.json honoured."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil

import numpy as np
import pytest

from opt_core import GenerationConfig, OPTConfig, resolve_generation_options
from opt_core.generation import reference_generate
from opt_core.generation_config import GENERATE_DOC
from opt_core.reference import ReferenceOPTForCausalLM

CONFIG = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=48, word_embed_proj_dim=16, do_layer_norm_before=False)
IDS = np.array([[1, 1, 2, 40, 41, 40], [2, 50, 51, 52, 53, 51]])
MASK = (np.arange(6)[None, :] >= np.array([[2], [0]])).astype(np.int64)
CONTRACT = ["max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
            "length_penalty", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id", "pad_token_id", "seed",
            "streamer", "early_stopping", "num_return_sequences", "penalty_alpha"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random tiny checkpoint (post-LN with projections), weights scaled up so greedy text varies;
    written once by torch, read by every backend and by the NumPy reference."""
    import torch

    from opt_torch import OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(25.0)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(backend, tiny_folder):
    return backend.load(tiny_folder)


@pytest.fixture(scope="session")
def reference(tiny_folder):
    return ReferenceOPTForCausalLM.from_pretrained(tiny_folder)


def run(backend, model, **kw):
    return backend.to_numpy(model.generate(IDS, attention_mask=MASK, **kw))


def test_one_signature_and_docstring(backend, tiny):
    params = list(inspect.signature(tiny.generate).parameters.values())
    assert [p.name for p in params] == ["input_ids", "attention_mask", *CONTRACT]
    assert params[1].default is None
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in params[2:])
    assert inspect.getdoc(tiny.generate) == inspect.cleandoc(GENERATE_DOC)


@pytest.mark.parametrize("kw", [{}, {"num_beams": 2}, {"do_sample": True, "seed": 1}, {"max_new_tokens": 0}],
                         ids=["greedy", "beam", "sample", "zero"])
def test_result_is_int64_with_the_prompt(backend, tiny, kw):
    out = tiny.generate(IDS, attention_mask=MASK, max_new_tokens=kw.pop("max_new_tokens", 4), **kw)
    assert backend.is_int64(out)
    np.testing.assert_array_equal(backend.to_numpy(out)[:, : IDS.shape[1]], IDS)


def test_max_new_tokens_zero_returns_the_prompt(backend, tiny):
    seen = []

    class Streamer:
        def put(self, ids):
            seen.append(np.asarray(ids))

        def end(self):
            seen.append("end")

    np.testing.assert_array_equal(run(backend, tiny, max_new_tokens=0, streamer=Streamer()), IDS)
    assert len(seen) == 2 and np.array_equal(seen[0], IDS) and seen[1] == "end"


def test_sampling_without_a_seed_differs_between_calls(backend, tiny):
    kw = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=2.0, eos_token_id=[])
    a, b = run(backend, tiny, **kw), run(backend, tiny, **kw)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("kw", [
    dict(top_k=0),
    dict(temperature=0.7, top_k=10, top_p=0.9),
    dict(temperature=1.5, top_k=0, top_p=0.8, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(top_k=5, min_new_tokens=3, eos_token_id=[7, 11]),
], ids=["plain", "warped", "penalised", "eos"])
@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_the_same_seed_samples_the_reference_tokens(backend, tiny, reference, kw, seed):
    """The seeded stream makes sampling a deterministic function shared with the NumPy reference
    (and so with every other backend)."""
    kw = dict(max_new_tokens=8, do_sample=True, seed=seed, **kw)
    got = run(backend, tiny, **kw)
    np.testing.assert_array_equal(got, run(backend, tiny, **kw))
    ref = reference_generate(reference, IDS, MASK, **kw)
    np.testing.assert_array_equal(got, ref, err_msg=f"{backend.name} vs NumPy reference, {kw}")


def test_num_return_sequences_samples_the_reference_rows(backend, tiny, reference):
    """n samples per prompt are rows b * n + j (Hugging Face's order), each drawn from the seeded
    stream of its own row: the reference's tokens, and different from each other."""
    kw = dict(max_new_tokens=6, do_sample=True, seed=11, top_k=0, num_return_sequences=2, eos_token_id=[])
    got = run(backend, tiny, **kw)
    assert got.shape == (2 * IDS.shape[0], IDS.shape[1] + 6)
    np.testing.assert_array_equal(got[::2, : IDS.shape[1]], IDS)
    np.testing.assert_array_equal(got, reference_generate(reference, IDS, MASK, **kw))
    assert not np.array_equal(got[0::2], got[1::2])


def ended_at_eos(free: np.ndarray, eos: list[int], pad: int) -> np.ndarray:
    """What greedy decoding with `eos` must return, derived from the same run without eos (`free`):
    each row keeps its tokens up to and including its first eos id, then pad; the result stops
    after the step at which the last row ended (or at the end of `free` when a row never does)."""
    new = free[:, IDS.shape[1]:]
    ends = [int(np.flatnonzero(np.isin(row, eos))[0]) + 1 if np.isin(row, eos).any() else new.shape[1]
            for row in new]
    out = free[:, : IDS.shape[1] + max(ends)].copy()
    for r, end in enumerate(ends):
        out[r, IDS.shape[1] + end:] = pad
    return out


def test_eos_none_empty_and_list(backend, tiny):
    free = run(backend, tiny, max_new_tokens=8, eos_token_id=[])
    assert free.shape[1] == IDS.shape[1] + 8
    first = int(free[0, IDS.shape[1]])  # row 0's first greedy token, made an eos id below
    second = int(free[1, IDS.shape[1] + 2])  # row 1's third
    assert second != first and not np.isin(free[1, IDS.shape[1]:IDS.shape[1] + 2], [first, second]).any(), (
        "the tiny model's greedy rows no longer give row 0 and row 1 different end steps"
    )
    one = run(backend, tiny, max_new_tokens=8, eos_token_id=first)
    np.testing.assert_array_equal(one, ended_at_eos(free, [first], CONFIG.pad_token_id))
    # A list: row 0 ends at its first token on the list's second id, row 1 at its third on the first.
    both = run(backend, tiny, max_new_tokens=8, eos_token_id=[second, first])
    np.testing.assert_array_equal(both, ended_at_eos(free, [second, first], CONFIG.pad_token_id))
    # None: the model's generation_config (from config.json here: eos 2)
    saved = tiny.generation_config
    tiny.generation_config = dataclasses.replace(saved, eos_token_id=first)
    try:
        np.testing.assert_array_equal(run(backend, tiny, max_new_tokens=8), one)
        np.testing.assert_array_equal(run(backend, tiny, max_new_tokens=8, eos_token_id=None), one)
    finally:
        tiny.generation_config = saved


@pytest.mark.parametrize("kw", [
    dict(top_k=-5), dict(eos_token_id=-1), dict(max_new_tokens=-1), dict(top_p=0.0), dict(num_beams=0),
    dict(do_sample=True, temperature=0.0), dict(repetition_penalty=-1.0), dict(seed=-1),
    dict(num_beams=2, do_sample=True), dict(no_repeat_ngram_size=-2), dict(max_new_tokens=100),
    dict(num_beams=2, num_return_sequences=3), dict(num_return_sequences=2), dict(num_return_sequences=0),
    dict(num_beams=2, early_stopping="sometimes"), dict(penalty_alpha=1.5),
], ids=lambda kw: ",".join(kw))
def test_one_validation_one_error_text(backend, tiny, kw):
    with pytest.raises(ValueError) as core:
        resolve_generation_options(CONFIG, tiny.generation_config, prompt_length=IDS.shape[1], **kw)
    with pytest.raises(ValueError) as ours:
        tiny.generate(IDS, attention_mask=MASK, **kw)
    assert str(ours.value) == str(core.value)


def test_top_k_error_text(backend, tiny):
    with pytest.raises(ValueError, match=r"^top_k must be an integer >= 0 \(0 turns top-k filtering off\), got -5$"):
        tiny.generate(IDS, top_k=-5)


def test_streamer_gets_the_prompt_then_each_step_and_the_unstreamed_tokens(backend, tiny):
    """put(prompt), put(tokens [B]) per step, end(); a streamer changes how tokens are delivered, not
    which (TF drives its XLA-compiled step from Python; Flax calls back from its compiled loop)."""
    seen = []

    class Streamer:
        def put(self, ids):
            seen.append(np.array(ids))

        def end(self):
            seen.append(None)

    kw = {"do_sample": True, "seed": 11, "top_k": 20, "temperature": 0.7, "repetition_penalty": 1.3,
          "no_repeat_ngram_size": 2, "min_new_tokens": 2, "max_new_tokens": 5, "eos_token_id": []}
    out = run(backend, tiny, streamer=Streamer(), **kw)
    assert seen[-1] is None and len(seen) == 7
    np.testing.assert_array_equal(seen[0], IDS)
    assert all(s.dtype == np.int64 and s.shape == (2,) for s in seen[1:-1])
    np.testing.assert_array_equal(np.stack(seen[1:-1], axis=1), out[:, IDS.shape[1]:])
    np.testing.assert_array_equal(out, run(backend, tiny, **kw))


def test_generation_config_json_is_honoured(backend, tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    file_values = {"max_new_tokens": 6, "repetition_penalty": 1.6, "no_repeat_ngram_size": 2, "eos_token_id": 95,
                   "pad_token_id": 1}
    (folder / "generation_config.json").write_text(json.dumps(file_values))
    model = backend.load(folder)
    assert model.generation_config == GenerationConfig.from_pretrained(folder)
    got = run(backend, model)
    np.testing.assert_array_equal(got, run(backend, model, **file_values))
    plain = run(backend, model, max_new_tokens=6, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert not np.array_equal(got, plain), "the file's penalties should change the greedy tokens"
