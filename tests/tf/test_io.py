"""What only opt_tf's io has: the `tf_h5=True` keyword of `save_pretrained` and its refusal of
float64. Everything the three backends share (Hugging Face-written folders, key variants, sharding,
strict accounting, missing files, task heads, dtypes, written paths, round trips of every head in
safetensors and tf_model.h5) is in tests/common/test_io.py."""

from __future__ import annotations

import numpy as np
import pytest

from opt_tf import OPTForCausalLM, OPTModel
from opt_tf.io import state_dict
from tests.tf.helpers import config, random_model

pytestmark = pytest.mark.tf


def test_tf_h5_keyword_and_float64_refused(tmp_path):
    model, _ = random_model(OPTForCausalLM, config("pre_ln"))
    written = model.save_pretrained(tmp_path, tf_h5=True)
    assert [p.name for p in written] == ["config.json", "model.safetensors", "tf_model.h5", "generation_config.json"]
    loaded = OPTForCausalLM.from_pretrained(tmp_path, format="tf-h5")
    for k, v in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(loaded)[k], v, err_msg=k)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        OPTModel.from_pretrained(tmp_path, dtype="float64")
