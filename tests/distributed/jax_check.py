"""One of N processes of a `jax.distributed` job (tests/distributed/test_flax_multiprocess.py): a tiny
model sharded on ("data", "model") meshes spanning every process, compared with this process alone.

Reads PROCESS_ID, NUM_PROCESSES, COORDINATOR and LOCAL_DEVICES from the environment; arguments are
mesh shapes ("2x2", "1x4") and `--quick` (greedy generation and one training step only: each
generation mode and step is one more compilation). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ.get('LOCAL_DEVICES', '2')}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from opt_core import OPTConfig  # noqa: E402
from opt_flax import OPTForCausalLM  # noqa: E402
from opt_flax.sharding import gather, make_mesh, shard_batch, shard_model  # noqa: E402
from opt_flax.training import make_optimizer, train_step  # noqa: E402
from tests.variants import relative_error  # noqa: E402

CONFIG = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=64, tie_word_embeddings=False, dropout=0.0)


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, CONFIG.vocab_size, (4, 10))
    mask = np.ones_like(ids)
    for i in range(4):  # left padding of 0..3 tokens
        mask[i, :i] = 0
        ids[i, :i] = 1
    return ids, mask


@nnx.jit
def forward(model, ids, mask):
    return model(ids, attention_mask=mask, validate=False).logits


def run(mesh=None, quick=False):
    ids, mask = batch()
    model = OPTForCausalLM(CONFIG, rngs=nnx.Rngs(0))  # the same weights on every process
    put = np.asarray if mesh is None else (lambda x: shard_batch(x, mesh))
    if mesh is not None:
        shard_model(model, mesh)
    logits = gather(forward(model, put(ids), put(mask)))
    tokens = {"greedy": gather(model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[]))}
    if not quick:
        tokens["beam"] = gather(model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2,
                                               eos_token_id=[]))
        tokens["sample"] = gather(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, seed=3,
                                                 eos_token_id=[]))
    opt = make_optimizer(model, learning_rate=1e-2)
    losses = [float(gather(train_step(model, opt, put(ids), put(mask), put(ids)))) for _ in range(1 if quick else 2)]
    return mask, logits, tokens, losses


def main():
    jax.distributed.initialize(os.environ["COORDINATOR"], int(os.environ["NUM_PROCESSES"]),
                               int(os.environ["PROCESS_ID"]))
    quick = "--quick" in sys.argv
    start = time.perf_counter()
    with jax.default_device(jax.local_devices()[0]):
        mask, logits, tokens, losses = run(quick=quick)  # this process alone, on one device
    results = {"process": jax.process_index(), "devices": jax.device_count(), "local": jax.local_device_count(),
               "one_process_seconds": time.perf_counter() - start}
    for shape in [a for a in sys.argv[1:] if not a.startswith("--")] or ["2x2"]:
        mesh = make_mesh(*(int(x) for x in shape.split("x")))
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            _, lg, tk, ls = run(mesh, quick)
        results[shape] = {
            "logits_rel_err": relative_error(lg, logits, mask),
            "tokens_equal": {k: bool(np.array_equal(tk[k], tokens[k])) for k in tokens},
            "losses": ls, "reference_losses": losses, "seconds": time.perf_counter() - start,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
