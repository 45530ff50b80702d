"""JAX across processes: 2 `jax.distributed` processes on 127.0.0.1, meshes spanning both, against
one process alone. The default test compiles little (each generation mode and training step is one
more XLA compilation per mesh); the slow one runs every mode on 2 CPU devices per process."""

from __future__ import annotations

import pytest

from tests.distributed.launch import processes

pytestmark = pytest.mark.flax


def check(results, meshes, local_devices, modes):
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["devices"] == 2 * local_devices and r["local"] == local_devices for r in results)
    for r in results:  # every process gathers the same global values
        for shape in meshes:
            m = r[shape]
            assert m["logits_rel_err"] < 1e-5, (shape, m)
            assert set(m["tokens_equal"]) == modes and all(m["tokens_equal"].values()), (shape, m)
            for ours, ref in zip(m["losses"], m["reference_losses"], strict=True):
                assert abs(ours - ref) <= 1e-5 * abs(ref), (shape, m)


def test_model_axis_across_two_processes():
    # 1x2 with one device each: tensor parallelism with every collective crossing processes.
    results, _ = processes("jax_check.py", ["1x2", "--quick"], n=2, env={"LOCAL_DEVICES": "1"})
    check(results, ["1x2"], 1, {"greedy"})


@pytest.mark.slow
def test_every_mode_on_meshes_spanning_two_processes():
    # 2x2: "data" across the processes, "model" within each; 1x4: "model" across them.
    results, _ = processes("jax_check.py", ["2x2", "1x4"], n=2, env={"LOCAL_DEVICES": "2"}, timeout=900)
    check(results, ["2x2", "1x4"], 2, {"greedy", "beam", "sample"})
