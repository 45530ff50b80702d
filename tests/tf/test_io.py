"""opt_tf.io: loading Hugging Face folders with strict accounting, saving, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from opt_core import CheckpointError
from opt_core.params import Head
from opt_tf import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel
from opt_tf.io import state_dict
from tests.tf.helpers import config, random_model
from tests.variants import left_padded_batch

pytestmark = pytest.mark.tf

CLASSES = [OPTModel, OPTForCausalLM, OPTForSequenceClassification, OPTForQuestionAnswering]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tf_h5", [False, True])
def test_save_load_round_trip(cls, tf_h5, tmp_path):
    cfg = config("post_ln_proj", num_labels=3)
    model, params = random_model(cls, cfg)
    model.save_pretrained(tmp_path, tf_h5=tf_h5)
    assert (tmp_path / "tf_model.h5").exists() == tf_h5
    saved = load_file(tmp_path / "model.safetensors")
    prefix = "" if cls is OPTModel else "model."
    assert f"{prefix}decoder.layers.0.fc1.weight" in saved and "lm_head.weight" not in saved
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]
    fmt = "tf-h5" if tf_h5 else "safetensors"
    loaded = cls.from_pretrained(tmp_path, format=fmt)
    a, b = state_dict(model), state_dict(loaded)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids, mask = left_padded_batch(cfg.vocab_size)
    out_a, out_b = model(ids, attention_mask=mask), loaded(ids, attention_mask=mask)
    for key in out_a.keys():
        np.testing.assert_array_equal(out_a[key].numpy(), out_b[key].numpy())


def test_sharded_safetensors(tmp_path):
    model, _ = random_model(OPTForCausalLM, config("pre_ln"))
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = OPTForCausalLM.from_pretrained(tmp_path)
    for k, v in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(loaded)[k], v)


def test_strict_accounting_names_every_problem(tmp_path):
    model, _ = random_model(OPTForCausalLM, config("pre_ln"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.decoder.layers.0.self_attn.qkj_proj.weight"] = np.zeros((2, 2), np.float32)
    del tensors["model.decoder.layers.1.fc2.bias"]
    tensors["model.decoder.layers.0.fc1.weight"] = tensors["model.decoder.layers.0.fc1.weight"].T.copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        OPTForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "qkj_proj" in msg and "layers.1.fc2.bias" in msg and "fc1.weight is [32, 64]" in msg


def test_base_checkpoint_into_task_head_initialises_the_head(tmp_path, caplog):
    model, _ = random_model(OPTForCausalLM, config("pre_ln"))
    model.save_pretrained(tmp_path)
    clf = OPTForSequenceClassification.from_pretrained(tmp_path)
    assert clf.loading_info.new_head == ["score.weight"]
    assert "lm_head.weight" not in clf.loading_info.ignored  # tied: not stored at all
    np.testing.assert_array_equal(
        state_dict(clf)["decoder.layers.0.fc1.weight"], state_dict(model)["decoder.layers.0.fc1.weight"]
    )
    base = OPTModel.from_pretrained(tmp_path)
    assert base.loading_info.ok


def test_missing_weights_and_unsupported_dtype(tmp_path):
    model, _ = random_model(OPTModel, config("pre_ln"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        OPTModel.from_pretrained(tmp_path, dtype="float64")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no OPT weights"):
        OPTModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        OPTModel.from_pretrained(tmp_path / "nope")


def test_head_table_checked(tmp_path):
    model, _ = random_model(OPTForQuestionAnswering, config("pre_ln"))
    model.save_pretrained(tmp_path, tf_h5=True)
    loaded = OPTForQuestionAnswering.from_pretrained(tmp_path, format="tf-h5")
    assert loaded.loading_info.ok and not loaded.loading_info.new_head
    assert Head(loaded.head) is Head.QUESTION_ANSWERING
