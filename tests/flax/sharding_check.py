"""Run by test_sharding.py in its own process with 8 virtual CPU devices; prints one JSON line.

For each mesh shape: logits vs one device (max relative error), greedy tokens equal, and the loss of
two optax steps vs the unsharded run.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from opt_core import OPTConfig  # noqa: E402
from opt_flax import OPTForCausalLM  # noqa: E402
from opt_flax.sharding import make_mesh, shard_batch, shard_model  # noqa: E402
from opt_flax.training import make_optimizer, train_step  # noqa: E402
from tests.variants import relative_error  # noqa: E402

# Dimensions divisible by 8 so every mesh splits heads, ffn and vocab evenly; untied lm_head so
# both vocab-parallel tables are exercised.
CONFIG = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=8,
                   max_position_embeddings=64, tie_word_embeddings=False)
MESHES = [tuple(int(x) for x in s.split("x")) for s in sys.argv[1:]] or [(1, 8), (2, 4), (8, 1)]
NEW_TOKENS = 8


@nnx.jit
def forward(model, ids, mask):
    return model(ids, attention_mask=mask, validate=False).logits


def run(mesh=None):
    rng = np.random.default_rng(0)
    b, t = 8, 12
    ids = rng.integers(4, CONFIG.vocab_size, (b, t))
    mask = np.ones_like(ids)
    for i in range(b):  # left padding of 0..3 tokens
        mask[i, : i % 4] = 0
        ids[i, : i % 4] = 1
    model = OPTForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    put = (lambda x: jnp.asarray(x)) if mesh is None else (lambda x: shard_batch(x, mesh))
    if mesh is not None:
        shard_model(model, mesh)
    logits = np.asarray(forward(model, put(ids), put(mask)))
    tokens = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS))
    opt = make_optimizer(model, learning_rate=1e-3)
    losses = [float(train_step(model, opt, put(ids), put(mask), put(ids))) for _ in range(2)]
    kernel = model.model.decoder.layers[0].fc1.kernel[...]
    from jax.sharding import PartitionSpec as P

    # A size-1 "model" axis normalises to replicated.
    split = mesh is not None and (mesh.shape["model"] == 1 or kernel.sharding.spec == P(None, "model"))
    return mask, logits, tokens, losses, split


def main():
    assert len(jax.devices()) == 8, jax.devices()
    mask, logits, tokens, losses, _ = run()
    results = {}
    for shape in MESHES:
        mesh = make_mesh(*shape)
        with jax.set_mesh(mesh):
            _, lg, tk, ls, spec = run(mesh)
        results["x".join(map(str, shape))] = {
            "logits_rel_err": relative_error(lg, logits, mask),
            "tokens_equal": bool(np.array_equal(tk, tokens)),
            "losses": ls, "reference_losses": losses, "fc1_column_parallel": spec,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
