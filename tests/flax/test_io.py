"""Loading Hugging Face-written folders and writing folders Hugging Face (and our reference) read."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from opt_core.checkpoint import CheckpointError, save_numpy_safetensors
from opt_core.params import Head
from opt_core.reference import ReferenceOPTForCausalLM
from opt_flax import OPTForCausalLM, OPTForSequenceClassification, OPTModel
from tests.flax.helpers import golden_model, write_random_checkpoint
from tests.golden import hf_golden
from tests.oracle import oracle_run
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.flax


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
@pytest.mark.parametrize("fmt", ["safetensors", "flax-msgpack"])
def test_hf_written_checkpoints_match_hf_logits(variant, fmt):
    g = hf_golden(variant)
    model = golden_model(variant, fmt)
    logits = np.asarray(model(g.ids, attention_mask=g.mask).logits)
    assert relative_error(logits, g.flax["logits"], g.mask) < TOLERANCE["float32"]
    assert relative_error(logits, g.torch["logits"], g.mask) < TOLERANCE["float32"]


def test_save_pretrained_round_trip_through_the_reference(tmp_path):
    model = golden_model("post_ln_proj")
    model.save_pretrained(tmp_path / "out", flax_msgpack=True)
    ids, mask = left_padded_batch()
    ref = ReferenceOPTForCausalLM.from_pretrained(tmp_path / "out")(ids, mask)
    ours = np.asarray(model(ids, attention_mask=mask).logits)
    assert relative_error(ours, ref.logits, mask) < TOLERANCE["float32"]
    for fmt in ("safetensors", "flax-msgpack"):
        again = OPTForCausalLM.from_pretrained(tmp_path / "out", format=fmt)
        assert np.array_equal(np.asarray(again(ids, attention_mask=mask).logits), ours)


@pytest.mark.oracle
def test_our_msgpack_loads_in_hf_flax(tmp_path):
    # An untied lm_head and a no-bias config exercise lm_head/kernel and the identity extras.
    config = VARIANTS["no_bias"].replace(tie_word_embeddings=False)
    from flax import nnx

    model = OPTForCausalLM(config, rngs=nnx.Rngs(3))
    folder = tmp_path / "hf"
    model.save_pretrained(folder, flax_msgpack=True, safetensors=False)
    ids, mask = left_padded_batch()
    (hf,) = oracle_run(folder, [{"framework": "flax", "input_ids": ids, "attention_mask": mask}])
    ours = np.asarray(model(ids, attention_mask=mask).logits)
    assert relative_error(ours, hf["logits"], mask) < TOLERANCE["float32"]


def test_strict_key_accounting(tmp_path):
    params = write_random_checkpoint(tmp_path, "pre_ln", Head.CAUSAL_LM)
    extra = {f"model.{k}" if k.startswith("decoder.") else k: v for k, v in params.items() if k != "lm_head.weight"}
    extra["model.decoder.layers.0.self_attn.qkj_proj.weight"] = np.zeros((2, 2), np.float32)
    del extra["model.decoder.layers.1.fc2.bias"]
    save_numpy_safetensors(tmp_path, extra)
    with pytest.raises(CheckpointError) as err:
        OPTForCausalLM.from_pretrained(tmp_path)
    assert "qkj_proj" in str(err.value) and "decoder.layers.1.fc2.bias" in str(err.value)


def test_heads_load_from_a_language_model_checkpoint():
    folder = hf_golden("pre_ln").folder
    base = OPTModel.from_pretrained(folder)  # lm_head ignored, as Hugging Face does
    cls = OPTForSequenceClassification.from_pretrained(folder)  # `score` initialised
    ids, mask = left_padded_batch()
    h = np.asarray(base(ids, attention_mask=mask).last_hidden_state)
    assert np.array_equal(h, np.asarray(cls.model(ids, attention_mask=mask).last_hidden_state))
    assert cls(ids, attention_mask=mask).logits.shape == (3, 2)


def test_missing_weights_name_the_folder(tmp_path):
    shutil.copy(hf_golden("pre_ln").folder / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="holds no OPT weights"):
        OPTForCausalLM.from_pretrained(tmp_path)
