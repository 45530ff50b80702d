"""Golden generation cases that can fail, answered by Hugging Face 4.57.6 (one cached oracle call).

The model is a tiny random OPT (vocab 64) written by Hugging Face with noise 0.5 on its weights:
large enough that greedy rows vary, small enough that a handful of ids recur, so the eos ids below
are reached at different steps in different rows, beams diverge from greedy and finish early, and
every penalty changes the tokens. `check_cases_bite` asserts those properties on Hugging Face's own
output, so a case that stopped exercising its option fails instead of passing vacuously.

    folder = golden_folder()                     # HF-written safetensors + generation_config.json
    ids, mask = golden_batch()                   # three left-padded prompts
    CASES["beam_es_true"]                        # generate's keywords (+ "early_stopping")
    expected = hf_sequences()["beam_es_true"]    # HF's int64 [3, prompt + generated]

A backend runs a case with `run_case(model, case, to_numpy)`: "early_stopping" is not a keyword of
`generate` (it is a generation_config field), so it goes through `model.generation_config`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from opt_core import OPTConfig
from tests.oracle import oracle_checkpoint, oracle_run
from tests.variants import left_padded_batch

CONFIG = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=64)
SEED, NOISE = 3, 0.5
EOS = 38  # greedy reaches it at step 10 in rows 0 and 2 and step 21 in row 1
EOS_LIST = [15, 23]  # greedy: row 2 at step 1, row 0 at step 11, row 1 never

CASES: dict[str, dict[str, Any]] = {
    "greedy_no_eos": {"max_new_tokens": 24, "eos_token_id": []},
    "greedy_eos": {"max_new_tokens": 24, "eos_token_id": EOS},
    "greedy_eos_list": {"max_new_tokens": 16, "eos_token_id": EOS_LIST},
    "beam": {"max_new_tokens": 16, "num_beams": 3, "eos_token_id": EOS},
    "beam_es_true": {"max_new_tokens": 16, "num_beams": 3, "eos_token_id": EOS, "early_stopping": True},
    "beam_lp_neg": {"max_new_tokens": 16, "num_beams": 4, "eos_token_id": EOS_LIST, "length_penalty": -3.0},
    "beam_lp_2": {"max_new_tokens": 16, "num_beams": 4, "eos_token_id": EOS_LIST, "length_penalty": 2.0},
    "beam_never": {"max_new_tokens": 16, "num_beams": 2, "eos_token_id": EOS_LIST, "length_penalty": 2.0,
                   "early_stopping": "never"},
    "beam_no_eos": {"max_new_tokens": 12, "num_beams": 3, "eos_token_id": []},
    "rep_1_5": {"max_new_tokens": 16, "repetition_penalty": 1.5, "eos_token_id": EOS},
    "rep_0_7": {"max_new_tokens": 16, "repetition_penalty": 0.7, "eos_token_id": []},
    "min_new": {"max_new_tokens": 16, "min_new_tokens": 12, "eos_token_id": EOS_LIST},
    "no_repeat_2": {"max_new_tokens": 16, "no_repeat_ngram_size": 2, "eos_token_id": []},
    "no_repeat_1": {"max_new_tokens": 12, "no_repeat_ngram_size": 1, "eos_token_id": EOS},
    "beam_penalties": {"max_new_tokens": 16, "num_beams": 3, "eos_token_id": EOS, "repetition_penalty": 1.3,
                       "no_repeat_ngram_size": 3, "min_new_tokens": 4},
}


# Run in float16 and bfloat16 too: Hugging Face in the same dtype gives the same tokens.
HALF_CASES = {
    "greedy_eos": {"max_new_tokens": 16, "eos_token_id": EOS},
    "beam_eos_list": {"max_new_tokens": 16, "num_beams": 3, "eos_token_id": EOS_LIST},
}
HALF_DTYPES = ("float16", "bfloat16")


def golden_folder() -> Path:
    return oracle_checkpoint(CONFIG, seed=SEED, noise=NOISE, formats=("safetensors",))


def golden_batch() -> tuple[np.ndarray, np.ndarray]:
    return left_padded_batch(CONFIG.vocab_size, seed=1)


def _hf_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    kw = {"do_sample": False, **case}
    if kw.get("eos_token_id") == []:
        kw["eos_token_id"] = None  # HF: no eos anywhere (the checkpoint's generation_config has none either)
    return kw


@functools.cache
def hf_sequences() -> dict[str, np.ndarray]:
    """Hugging Face torch's `generate` for every case, keyed by case name (float32) and by
    "dtype/name" for HALF_CASES; one cached oracle call."""
    ids, mask = golden_batch()
    names, runs = [], []
    for name, case in CASES.items():
        names.append(name)
        runs.append({"framework": "torch", "input_ids": ids, "attention_mask": mask, "generate": _hf_kwargs(case)})
    for dtype in HALF_DTYPES:
        for name, case in HALF_CASES.items():
            names.append(f"{dtype}/{name}")
            runs.append({"framework": "torch", "input_ids": ids, "attention_mask": mask, "dtype": dtype,
                         "generate": _hf_kwargs(case)})
    return {name: res["sequences"].astype(np.int64) for name, res in zip(names, oracle_run(golden_folder(), runs))}


def run_case(model: Any, case: dict[str, Any], to_numpy: Callable[[Any], np.ndarray]) -> np.ndarray:
    """`model.generate` on the golden batch with `case` (early_stopping set via generation_config)."""
    ids, mask = golden_batch()
    case = dict(case)
    saved = model.generation_config
    if "early_stopping" in case:
        model.generation_config = dataclasses.replace(saved, early_stopping=case.pop("early_stopping"))
    try:
        return to_numpy(model.generate(ids, attention_mask=mask, do_sample=False, **case))
    finally:
        model.generation_config = saved


def eos_steps(seq: np.ndarray, prompt: int, eos: list[int]) -> list[int | None]:
    """Per row, the generated step at which an eos first appears (None: never)."""
    out = []
    for row in seq[:, prompt:]:
        hits = np.flatnonzero(np.isin(row, eos))
        out.append(int(hits[0]) if hits.size else None)
    return out


def check_cases_bite(hf: dict[str, np.ndarray]) -> None:
    """Raise AssertionError when a golden case no longer exercises what it is there for."""
    prompt = golden_batch()[0].shape[1]
    plain = hf["greedy_no_eos"]
    steps = eos_steps(hf["greedy_eos"], prompt, [EOS])
    assert len(set(steps)) > 1 and None not in steps, f"eos {EOS} should end rows at different steps: {steps}"
    steps = eos_steps(hf["greedy_eos_list"], prompt, EOS_LIST)
    assert len(set(steps)) == 3, f"eos {EOS_LIST} should end rows at three different steps: {steps}"
    assert hf["greedy_eos"].shape[1] < plain.shape[1], "greedy with eos should stop before max_new_tokens"
    beams = ["beam", "beam_es_true", "beam_lp_neg", "beam_lp_2", "beam_never"]
    assert any(hf[b].shape[1] < prompt + CASES[b]["max_new_tokens"] for b in beams), "no beam search finished early"
    assert len({hf[b].tobytes() + bytes(hf[b].shape) for b in beams}) >= 3, "beam options do not change the output"
    n = hf["beam_no_eos"].shape[1]
    assert not np.array_equal(hf["beam_no_eos"], plain[:, :n]), "beam search equals greedy"
    for name in ("rep_1_5", "rep_0_7", "no_repeat_2", "no_repeat_1", "min_new"):
        got = hf[name]
        ref = hf["greedy_eos_list"] if name == "min_new" else plain
        n = min(got.shape[1], ref.shape[1])
        assert not np.array_equal(got[:, :n], ref[:, :n]), f"{name} does not change the output"


def generate_with_config(backend, model, config, **kwargs):
    """`model.generate(golden batch, **kwargs)` as NumPy while `config` is its generation config
    (the file's defaults, e.g. pad_token_id None, that a keyword cannot express), restored after."""
    ids, mask = golden_batch()
    saved = model.generation_config
    model.generation_config = config
    try:
        return backend.to_numpy(model.generate(ids, attention_mask=mask, **kwargs))
    finally:
        model.generation_config = saved
