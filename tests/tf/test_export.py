"""SavedModel export: the serving signature reloads in a fresh process and gives the same tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from opt_tf.export import export_saved_model
from tests.golden import NEW_TOKENS, hf_golden
from tests.tf.helpers import golden_causal_lm

pytestmark = [pytest.mark.tf, pytest.mark.oracle]

RELOAD = """
import sys
import numpy as np
import tensorflow as tf
folder, inputs, out = sys.argv[1:4]
d = np.load(inputs)
serve = tf.saved_model.load(folder).signatures["serving_default"]
res = serve(input_ids=tf.constant(d["ids"], tf.int64), attention_mask=tf.constant(d["mask"], tf.int64),
            max_new_tokens=tf.constant(int(d["new"]), tf.int64))
assert res["sequences"].dtype == tf.int64, res["sequences"].dtype
np.savez(out, full=res["sequences"].numpy())
res = serve(input_ids=tf.constant(d["ids"][1:], tf.int64), attention_mask=tf.constant(d["mask"][1:], tf.int64),
            max_new_tokens=tf.constant(5, tf.int64))
np.savez(out + ".short.npz", short=res["sequences"].numpy())
"""


def test_saved_model_serves_the_same_tokens_in_a_fresh_process(tmp_path):
    g = hf_golden("pre_ln")
    model = golden_causal_lm("pre_ln")
    export_saved_model(model, tmp_path / "served", max_length=48)
    np.savez(tmp_path / "in.npz", ids=g.ids, mask=g.mask, new=NEW_TOKENS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "served"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        check=True, env=env, cwd=tmp_path, timeout=600,
    )
    served = np.load(tmp_path / "out.npz")["full"]
    np.testing.assert_array_equal(served, g.torch["greedy"])  # == HF greedy == our generate
    short = np.load(tmp_path / "out.npz.short.npz")["short"]
    np.testing.assert_array_equal(short, g.torch["greedy"][1:, : g.ids.shape[1] + 5])


def test_export_rejects_a_cache_longer_than_the_positions(tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        export_saved_model(golden_causal_lm("pre_ln"), tmp_path / "x", max_length=1000)
