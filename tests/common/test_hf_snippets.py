"""The OPT documentation's snippets run with only the import lines changed (examples/hf_snippets_*.py)
and give Hugging Face 4.57.6's tokens: torch's SDPA snippet in float16 (Hugging Face runs the
original lines with `torch_dtype=torch.float16, attn_implementation="sdpa"`), its flash-attention-2
snippet refusing clearly without a GPU, and the same call sequence with TF's and Flax's classes
(`return_tensors="tf"` / `"jax"`) against Hugging Face's TFOPTForCausalLM and torch float32 (its
Flax class cannot run this case; see the Flax test).

The prompt is the documentation's; greedy, 30 new tokens, on the bundled model.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from opt_core import OPTTokenizer, bundled
from tests.oracle import oracle_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GREEDY_30 = {"max_new_tokens": 30, "do_sample": False}  # the snippets' generate keywords


@functools.cache
def example(backend: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hf_snippets_{backend}", EXAMPLES / f"hf_snippets_{backend}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def tokenizer() -> OPTTokenizer:
    return OPTTokenizer.from_pretrained(bundled.path())


def hugging_face_ids(framework: str, generate: dict[str, Any] = GREEDY_30, **options: Any) -> np.ndarray:
    """Hugging Face's `generate` on the snippet's prompt (its ids from our tokenizer, which equal
    GPT2Tokenizer's: tests/core/test_tokenizer.py), with the snippet's keywords; cached."""
    enc = tokenizer()([example("torch").PROMPT], return_tensors="np")
    run = {"framework": framework, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "generate": generate, **options}
    return oracle_run(bundled.path(), [run])[0]["sequences"]


def with_the_files_penalties() -> dict[str, Any]:
    """The snippet's keywords plus the penalties the bundled generation_config.json sets (which an
    explicit do_sample=False keeps applying, in Hugging Face as here). Hugging Face's TF loader
    returns before reading generation_config.json when it converts torch weights (`from_pt=True`,
    its only way to read this folder), so its run is given them explicitly."""
    config = json.loads((bundled.path() / "generation_config.json").read_text())
    penalties = {k: config[k] for k in ("repetition_penalty", "no_repeat_ngram_size")}
    assert penalties["repetition_penalty"] != 1.0 and penalties["no_repeat_ngram_size"] > 0  # they matter here
    return {**GREEDY_30, **penalties}


def _check(ids: Any, text: str, expected: np.ndarray) -> None:
    ids = np.asarray(ids)
    prompt_length = tokenizer()([example("torch").PROMPT])["input_ids"].shape[1]
    assert expected.shape == (1, prompt_length + 30)  # Hugging Face did generate 30 tokens
    np.testing.assert_array_equal(ids, expected)
    assert text == tokenizer().batch_decode(expected)[0]
    assert text.startswith("</s>" + example("torch").PROMPT)  # batch_decode keeps specials, as Hugging Face's


@pytest.mark.oracle
@pytest.mark.torch
def test_the_sdpa_snippet_in_float16_gives_hugging_faces_tokens():
    ids, text = example("torch").sdpa_snippet()
    assert ids.dtype.is_floating_point is False and ids.device.type == example("torch").DEVICE
    _check(ids.cpu(), text, hugging_face_ids("torch", dtype="float16", attn_implementation="sdpa"))


@pytest.mark.torch
def test_the_flash_attention_snippet_refuses_clearly_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: flash attention's refusal is the CPU case")
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' needs a CUDA GPU"):
        example("torch").flash_attention_snippet()


@pytest.mark.oracle
@pytest.mark.tf
def test_the_tf_snippet_gives_hugging_faces_tokens():
    ids, text = example("tf").snippet()
    _check(ids, text, hugging_face_ids("tf", with_the_files_penalties()))
    _check(ids, text, hugging_face_ids("torch"))  # float32, reading generation_config.json itself


@pytest.mark.oracle
@pytest.mark.flax
def test_the_flax_snippet_gives_hugging_faces_tokens():
    # Hugging Face's own Flax generate cannot run this case: its no_repeat_ngram_size processor
    # raises NotImplementedError (bcoo_gather with mode CLIP) under the oracle's JAX. Hugging Face
    # torch in float32 runs the same call.
    ids, text = example("flax").snippet()
    _check(ids, text, hugging_face_ids("torch"))
