"""JAX across processes: 2 `jax.distributed` processes on 127.0.0.1 with 2 CPU devices each, meshes
spanning both, against one process alone."""

from __future__ import annotations

import pytest

from tests.distributed.launch import processes

pytestmark = pytest.mark.flax

# 2x2: "data" across the processes, "model" within each; 1x4: "model" (tensor parallelism) across them.
MESHES = ["2x2", "1x4"]


@pytest.fixture(scope="module")
def results():
    outs, _ = processes("jax_check.py", MESHES, n=2, env={"LOCAL_DEVICES": "2"})
    return outs


def test_processes_see_the_global_mesh(results):
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["devices"] == 4 and r["local"] == 2 for r in results)


@pytest.mark.parametrize("shape", MESHES)
def test_logits_tokens_and_loss_match_one_process(results, shape):
    for r in results:  # every process gathers the same global values
        m = r[shape]
        assert m["logits_rel_err"] < 1e-5, m
        assert all(m["tokens_equal"].values()), m
        for ours, ref in zip(m["losses"], m["reference_losses"]):
            assert abs(ours - ref) <= 1e-5 * abs(ref), m
