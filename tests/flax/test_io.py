"""What only opt_flax's io has: Hugging Face's Flax classes load the `flax_model.msgpack` we write
(with `save_pretrained(flax_msgpack=True, safetensors=False)`). Everything the three backends share
(Hugging Face-written folders, key variants, sharding, strict accounting, missing files, task heads,
dtypes, written paths, round trips of every head in safetensors and flax_model.msgpack, the float64
reference reading what we wrote) is in tests/common/test_io.py."""

from __future__ import annotations

import numpy as np
import pytest

from opt_flax import OPTForCausalLM
from tests.oracle import oracle_run
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.flax


@pytest.mark.oracle
def test_our_msgpack_loads_in_hf_flax(tmp_path):
    # An untied lm_head and a no-bias config exercise lm_head/kernel and the identity extras.
    config = VARIANTS["no_bias"].replace(tie_word_embeddings=False)
    from flax import nnx

    model = OPTForCausalLM(config, rngs=nnx.Rngs(3))
    folder = tmp_path / "hf"
    written = model.save_pretrained(folder, flax_msgpack=True, safetensors=False)
    assert [p.name for p in written] == ["config.json", "flax_model.msgpack", "generation_config.json"]
    ids, mask = left_padded_batch()
    (hf,) = oracle_run(folder, [{"framework": "flax", "input_ids": ids, "attention_mask": mask}])
    ours = np.asarray(model(ids, attention_mask=mask).logits)
    assert relative_error(ours, hf["logits"], mask) < TOLERANCE["float32"]
