"""opt_tf `from_pretrained(quantize=...)`: int8 weight-only and w8a8 logits close to float32 on the
bundled model, and generation runs (the accuracy guard itself is tests/torch/test_quantize.py)."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import bundled
from opt_tf import OPTForCausalLM

pytestmark = pytest.mark.tf

IDS = np.array([[2, 10, 20, 30, 40, 50, 60, 70]])


@pytest.fixture(scope="module")
def float_logits():
    return np.asarray(OPTForCausalLM.from_pretrained(bundled.path())(input_ids=IDS).logits)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_quantized_logits_and_generate(mode, float_logits):
    model = OPTForCausalLM.from_pretrained(bundled.path(), quantize=mode)
    logits = np.asarray(model(input_ids=IDS).logits)
    assert np.linalg.norm(logits - float_logits) / np.linalg.norm(float_logits) < 5e-3
    # The weights really are int8 (not a float copy left in use).
    assert dict(model.quantization)["mode"] == mode
    assert model.get_decoder().layers[0].fc1.qkernel.numpy().dtype == np.int8
    out = np.asarray(model.generate(IDS, max_new_tokens=3))
    assert out.shape == (1, IDS.shape[1] + 3)


def test_unknown_mode():
    with pytest.raises(ValueError, match="quantize="):
        OPTForCausalLM.from_pretrained(bundled.path(), quantize="int4")
