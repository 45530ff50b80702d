"""Hugging Face's everyday calls, in all three backends, on the bundled model:

    enc = tokenizer(prompts, return_tensors="pt" | "tf" | "jax", padding=True)
    model(**enc); model.generate(**enc, max_new_tokens=..., do_sample=False)
    OPTForSequenceClassification.from_pretrained(path, num_labels=3, dropout=0.0)

and, torch only, `torch_dtype=` (the older spelling of `dtype`) and `attn_implementation=`. The
encoding must give exactly what the NumPy ids give (the calls differ only in how the ids travel).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from opt_core import CheckpointError, OPTTokenizer, bundled
from opt_core.params import Head
from tests.variants import TOLERANCE

RETURN_TENSORS = {"torch": "pt", "tf": "tf", "flax": "jax"}
PROMPTS = ["ROMEO:", "To be, or not to be"]


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    return OPTTokenizer.from_pretrained(bundled.path())


def test_batch_encoding_unpacks_into_the_model_and_generate(backend, tok):
    model = backend.model_class(Head.CAUSAL_LM).from_pretrained(bundled.path())
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors=RETURN_TENSORS[backend.name])
    plain = tok(PROMPTS, padding=True, padding_side="left", return_tensors="np")
    real = plain["attention_mask"].astype(bool)  # padded positions' outputs are arbitrary
    np.testing.assert_array_equal(
        backend.forward(model, plain["input_ids"], attention_mask=plain["attention_mask"])["logits"][real],
        backend.to_numpy(model(**enc).logits)[real],
    )
    new = model.generate(**enc, max_new_tokens=3, do_sample=False)
    expected = model.generate(plain["input_ids"], attention_mask=plain["attention_mask"], max_new_tokens=3,
                              do_sample=False)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(expected))
    assert np.asarray(new).shape == (2, plain["input_ids"].shape[1] + 3)


def test_from_pretrained_takes_config_overrides(backend, tok, tmp_path):
    cls = backend.model_class(Head.SEQUENCE_CLASSIFICATION)
    model = cls.from_pretrained(bundled.path(), num_labels=3, dropout=0.0, attention_dropout=0.0)
    assert (model.config.num_labels, model.config.dropout) == (3, 0.0)
    assert model.config.extra["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert model.loading_info.new_head  # the bundled causal LM has no classification head: a fresh one of 3 labels
    enc = tok(PROMPTS, padding=True, return_tensors=RETURN_TENSORS[backend.name])
    logits = backend.to_numpy(model(**enc).logits)
    assert logits.shape == (2, 3)
    # Saved with its new head and label maps, it reloads as it is without the overrides.
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["id2label"] == model.config.extra["id2label"]
    again = cls.from_pretrained(tmp_path)
    assert again.config.num_labels == 3 and not again.loading_info.new_head
    np.testing.assert_array_equal(backend.to_numpy(again(**enc).logits), logits)
    with pytest.raises(CheckpointError, match=r"score.weight is \[3, 256\], the config implies \[4, 256\]"):
        cls.from_pretrained(tmp_path, num_labels=4)  # a stored head of another size is not silently replaced
    named = cls.from_pretrained(tmp_path, id2label={0: "neg", 1: "neu", 2: "pos"})
    assert named.config.extra["label2id"] == {"neg": 0, "neu": 1, "pos": 2}


def test_from_pretrained_refuses_bad_overrides_by_name(backend):
    cls = backend.model_class(Head.CAUSAL_LM)
    with pytest.raises(TypeError, match=r"'num_lables'.*neither an option of this backend \(.*revision"):
        cls.from_pretrained(bundled.path(), num_lables=3)
    with pytest.raises(ValueError, match=r"OPTConfig.dropout must be a probability in \[0, 1\], got 2"):
        cls.from_pretrained(bundled.path(), dropout=2)
    if backend.name != "torch":  # torch's older names for its own options are refused elsewhere, by name
        with pytest.raises(TypeError, match="torch_dtype=.*pass dtype="):
            cls.from_pretrained(bundled.path(), torch_dtype="float16")
        with pytest.raises(TypeError, match="'attn_implementation'"):
            cls.from_pretrained(bundled.path(), attn_implementation="sdpa")


@pytest.mark.torch
def test_torch_dtype_is_the_older_spelling_of_dtype(tok):
    import torch

    from opt_torch import OPTForCausalLM

    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    new = OPTForCausalLM.from_pretrained(bundled.path(), dtype=torch.float16)
    for spelling in (torch.float16, "float16"):
        old = OPTForCausalLM.from_pretrained(bundled.path(), torch_dtype=spelling)
        assert {p.dtype for p in old.parameters()} == {torch.float16}
        with torch.no_grad():
            torch.testing.assert_close(old(**enc).logits, new(**enc).logits, rtol=0, atol=0)


@pytest.mark.torch
def test_attn_implementation_on_from_pretrained(tok):
    import torch

    from opt_torch import OPTForCausalLM

    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    mask = enc["attention_mask"].bool()
    logits = {}
    for impl in ("eager", "sdpa"):
        model = OPTForCausalLM.from_pretrained(bundled.path(), attn_implementation=impl)
        assert {layer.self_attn.attn_implementation for layer in model.model.decoder.layers} == {impl}
        with torch.no_grad():
            logits[impl] = model(**enc).logits[mask]  # real tokens only: padded positions are arbitrary
    error = (logits["sdpa"] - logits["eager"]).abs().max() / logits["eager"].abs().max()
    assert error <= TOLERANCE["float32"], float(error)
    with pytest.raises(ValueError, match="attn_implementation 'flash' is unknown"):
        OPTForCausalLM.from_pretrained(bundled.path(), attn_implementation="flash")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash_attention_2.*needs a CUDA GPU"):
            OPTForCausalLM.from_pretrained(bundled.path(), attn_implementation="flash_attention_2")
