"""What only opt_torch.training has: accumulation equals the big batch, gradient checkpointing and
bf16 autocast change nothing, weight decay on matrices only. The training tests every backend
passes (the loss falls, checkpoints, evaluation, classification and QA) are tests/common/."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opt_core.training_args import TrainingArguments
from opt_torch import OPTForCausalLM
from opt_torch.training import make_training_optimizer, train_causal_lm
from tests.training.tasks import TINY_TRAIN, affine_blocks

pytestmark = pytest.mark.torch

ARGS = TrainingArguments(max_steps=12, batch_size=8, block_size=32, learning_rate=1e-2, warmup_steps=2,
                         log_every=100)


def _model(config=TINY_TRAIN, cls=OPTForCausalLM, seed=0):
    torch.manual_seed(seed)
    return cls(config)


def test_gradient_accumulation_equals_the_big_batch():
    blocks = affine_blocks()
    big = train_causal_lm(_model(), blocks, ARGS.replace(max_steps=3), log=None)
    acc = train_causal_lm(_model(), blocks, ARGS.replace(max_steps=6, batch_size=4,
                                                         gradient_accumulation_steps=2), log=None)
    # Same rows per step? No: the stream cuts batches of 4, so step s of the accumulated run sees
    # rows 8s..8s+7 of the same shuffled order, as the big batch does.
    np.testing.assert_allclose(acc.losses[:3], big.losses, rtol=2e-5)


def test_gradient_checkpointing_and_bf16_autocast():
    blocks = affine_blocks()
    plain = train_causal_lm(_model(), blocks, ARGS.replace(max_steps=4), log=None)
    ckpt = train_causal_lm(_model(), blocks, ARGS.replace(max_steps=4, gradient_checkpointing=True), log=None)
    np.testing.assert_allclose(ckpt.losses, plain.losses, rtol=1e-5)
    bf16 = train_causal_lm(_model(), blocks, ARGS.replace(bf16=True), log=None)
    assert all(math.isfinite(x) for x in bf16.losses)
    assert bf16.losses[-1] < bf16.losses[0] - 0.3
    assert abs(bf16.losses[0] - plain.losses[0]) < 0.05  # bfloat16 keeps ~3 significant digits


def test_weight_decay_only_on_matrices():
    model = _model()
    opt = make_training_optimizer(model, ARGS)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


def test_blocks_longer_than_context_are_refused():
    with pytest.raises(ValueError, match="longer than the model's context"):
        train_causal_lm(_model(), affine_blocks(length=80), ARGS, log=None)




def test_fsdp_outside_a_distributed_launch_says_so(monkeypatch):
    """fsdp=True in a plain process: the error names FSDP and torchrun, not tensor parallelism."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    blocks = affine_blocks()
    with pytest.raises(ValueError, match=r"fsdp=True shards .* run under `torchrun") as info:
        train_causal_lm(_model(), blocks, ARGS.replace(max_steps=1), log=None, fsdp=True)
    assert "tp_plan" not in str(info.value)
