"""Filling a built torch model from a checkpoint, one tensor at a time: what `opt_torch.io` does for
every load and `opt_torch.offload` for the layers it streams in per forward. Apart from `io` so that
`offload`, which `io` calls for device maps, imports no module that imports it back.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import Any

import torch

from opt_core import CheckpointError
from opt_core.checkpoint import CheckpointLoad
from opt_core.formats import Scratch
from opt_core.params import hf_name, parameter_table
from opt_torch.arrays import numpy_to_tensor, tensor_to_numpy

logger = logging.getLogger("opt_torch")
_CHUNK_BYTES = 2 << 20  # bounded read buffer for parameters that cannot be read in place


@torch.no_grad()
def read_parameter(target: torch.Tensor, ckpt: Any, name: str, scratch: Scratch) -> None:
    """Read canonical tensor `name` of `ckpt` (a `CheckpointLoad`, or anything with its `read`,
    `dtype`, `get_slice` and `reader`) into `target`: straight into its memory when it is a
    contiguous CPU tensor of the stored dtype, else a few rows at a time or through `scratch`."""
    stored = ckpt.dtype(name)
    if (target.device.type == "cpu" and target.is_contiguous()
            and tensor_to_numpy(target[:0].reshape(-1)).dtype == stored):
        ckpt.read(name, out=tensor_to_numpy(target))  # into the parameter itself
    elif ckpt.reader.reads_row_slices and target.dim() >= 1 and target.shape[0] > 1:
        # Another dtype, device or layout (input-major weights): a few rows at a time.
        rows = ckpt.get_slice(name)
        step = max(1, _CHUNK_BYTES // max(1, target[0].numel() * stored.itemsize))
        for r in range(0, target.shape[0], step):
            target[r : r + step].copy_(numpy_to_tensor(rows[r : r + step]))
    else:
        arr = ckpt.read(name, out=scratch.array(tuple(target.shape), stored))
        target.copy_(numpy_to_tensor(arr))


def fill_parameters(model: Any, ckpt: CheckpointLoad, skip: Container[str] = ()) -> None:
    """Copy every tensor of `ckpt` into `model`'s parameters, one at a time (`read_parameter`).
    Tied parameters absent from the checkpoint are re-tied; head parameters the checkpoint lacks
    are initialised (with a warning). Canonical names in `skip` are left alone (a loader that
    streams them later: `opt_torch.offload`).

    Raises:
        CheckpointError: a parameter left unfilled (never hands out uninitialised memory).
    """
    config, head, acc = ckpt.config, ckpt.head, ckpt.accounting
    params = dict(model.named_parameters(remove_duplicate=False))
    scratch = Scratch()
    filled: set[str] = set()
    with torch.no_grad():
        for name in ckpt.names:
            if name not in skip:
                read_parameter(params[hf_name(name, head)], ckpt, name, scratch)
            filled.add(name)
        for name in acc.tied:
            spec = next(s for s in parameter_table(config, head) if s.name == name)
            target, source = params[hf_name(name, head)], params[hf_name(spec.tied_to, head)]
            if target.data_ptr() != source.data_ptr():
                target.copy_(source)
            filled.add(name)
        if acc.new_head:
            for name in acc.new_head:
                model.init_weights(model.get_submodule(hf_name(name, head).rsplit(".", 1)[0]))
                filled.add(name)
            logger.warning(
                "%s has no %s head; initialised %s from N(0, %s) (biases 0): train them before use",
                ckpt.source, head.value, ", ".join(acc.new_head), config.init_std,
            )
    unfilled = [s.name for s in parameter_table(config, head) if s.name not in filled]
    if unfilled:  # account_keys guarantees this cannot happen
        raise CheckpointError(f"{ckpt.source}: tensors left unfilled after loading: {unfilled}")
