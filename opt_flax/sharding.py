"""Partition rules for a `jax.sharding.Mesh` with axes ("data", "model"): Megatron tensor parallelism
plus data parallelism.

- q/k/v_proj and fc1 are column-parallel: kernels [in, out] split on `out`, biases split.
- out_proj and fc2 are row-parallel: kernels split on `in`, biases replicated (added after the
  all-reduce XLA inserts).
- The token embedding [V, E] and an untied lm_head [E, V] are vocab-parallel; logits come out split
  over the vocabulary.
- Positions, LayerNorms, projections and the small task heads are replicated.
- Activations and the KV cache split their batch over "data" and their heads over "model"
  (`opt_flax.modeling.constrain` pins them when the mesh is active: `with jax.set_mesh(mesh):`).

Usage:

    mesh = make_mesh(data=2, model=4)
    model = shard_model(model, mesh)
    with jax.set_mesh(mesh):
        out = model(shard_batch(ids, mesh), attention_mask=shard_batch(mask, mesh))
        new = model.generate(ids, attention_mask=mask, max_new_tokens=32)
    gather(out.logits)                   # the full array as NumPy, on every process

Across processes (`jax.distributed.initialize(...)` first; the mesh then spans every process's
devices): the same calls work. A process can only place data on its own devices, so `shard_model`,
`shard_batch` and `shard_cache` build each global array from the slices this process's devices hold
(`jax.make_array_from_callback`; every process passes the same full value), `shard_process_batch`
takes just this process's rows (`jax.make_array_from_process_local_data`), and `gather` collects a
result that spans processes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opt_flax.cache import StaticCache

AXES = ("data", "model")

# (regex over the "/"-joined nnx.state path, PartitionSpec); the first match wins.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("model", None)),  # vocab-parallel [V, E]
    (r"lm_head/kernel$", P(None, "model")),  # vocab-parallel [E, V]
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P(None, "model")),  # column-parallel [C, C]
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("model")),
    (r"fc1/kernel$", P(None, "model")),  # column-parallel [C, F]
    (r"fc1/bias$", P("model")),
    (r"self_attn/out_proj/kernel$", P("model", None)),  # row-parallel [C, C]
    (r"fc2/kernel$", P("model", None)),  # row-parallel [F, C]
    (r".*", P()),  # everything else replicated
)


def make_mesh(data: int, model: int, devices: Any = None) -> Mesh:
    """A (data, model) mesh over the first data * model devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size < data * model:
        raise ValueError(f"a ({data}, {model}) mesh needs {data * model} devices; {devices.size} are available")
    return Mesh(devices.reshape(-1)[: data * model].reshape(data, model), AXES)


def partition_spec(path: tuple[Any, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of the parameter at `path` (first matching rule).

    Raises:
        ValueError: a split dimension is not divisible by its mesh axis.
    """
    name = "/".join(str(p) for p in path)
    spec = next(s for pattern, s in PARTITION_RULES if re.search(pattern, name))
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(
                f"parameter {name} dim of size {dim} is not divisible by mesh axis {axis!r} "
                f"({mesh.shape[axis]}); choose a mesh whose 'model' size divides heads, ffn_dim and vocab"
            )
    return spec


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A State of NamedShardings mirroring `state` (parameters by rule, other variables replicated)."""

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        spec = partition_spec(path, shape, mesh) if len(shape) else P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(lambda kp, x: one(_path(kp), x), state)


def _path(keypath: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pytree key path -> the nnx.state path (dict keys and list indices; no `.value` suffix)."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (the full value, the same on every process) as a global array with `sharding`: a plain
    `device_put` within one process; across processes each builds only the slices its devices hold."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):  # an RNG key: place its data
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(x: Any) -> np.ndarray:
    """A (possibly multi-process) array as one full NumPy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_model(model: Any, mesh: Mesh) -> Any:
    """Place every variable of `model` on `mesh` by the partition rules (in place; returns `model`).
    Across processes every process must hold the same values (same seed, or the same checkpoint)."""
    state = nnx.state(model)
    sharded = jax.tree.map(put, state, state_shardings(state, mesh))
    nnx.update(model, sharded)
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] inputs: rows split over "data"."""
    return NamedSharding(mesh, P("data", None))


def shard_batch(x: Any, mesh: Mesh) -> jax.Array:
    """Put a [B, ...] input (the global batch, the same on every process) on `mesh`, rows split over
    "data"."""
    x = np.asarray(x)
    return put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))


def shard_process_batch(local_rows: Any, mesh: Mesh) -> jax.Array:
    """The global [B, ...] batch from this process's rows only (each process passes its own share,
    in process order), rows split over "data"."""
    local_rows = np.asarray(local_rows)
    sharding = NamedSharding(mesh, P("data", *([None] * (local_rows.ndim - 1))))
    return jax.make_array_from_process_local_data(sharding, local_rows)


def cache_sharding(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """NamedShardings of a `StaticCache`: (keys/values [B, N, S, H]: batch over "data", heads over
    "model"; the length scalar: replicated)."""
    return NamedSharding(mesh, P("data", "model", None, None)), NamedSharding(mesh, P())


def shard_cache(cache: StaticCache, mesh: Mesh) -> StaticCache:
    """Place a `StaticCache` on `mesh` (see `cache_sharding`)."""
    kv, scalar = cache_sharding(mesh)
    return StaticCache(
        tuple(put(k, kv) for k in cache.keys),
        tuple(put(v, kv) for v in cache.values),
        put(cache.length, scalar),
    )
