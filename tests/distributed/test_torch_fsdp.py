"""FSDP2 training over 2 local gloo processes (torchrun) against one process on the same global batch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from opt_core import OPTConfig
from opt_core.training_args import TrainingArguments
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.torch

# No dropout: with it each rank draws masks for its own rows, so curves agree only in distribution.
CONFIG = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=64, dropout=0.0)
# Accumulation and (active) clipping on; checkpoints at step 2 and the end.
ARGS = TrainingArguments(max_steps=4, batch_size=4, gradient_accumulation_steps=2, block_size=16,
                         learning_rate=3e-3, warmup_steps=1, max_grad_norm=0.5, save_every=2, log_every=1)


def args(**changes) -> TrainingArguments:
    return dataclasses.replace(ARGS, **changes)


def make_model(seed: int = 0):
    from opt_torch import OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(CONFIG)


def training_blocks() -> np.ndarray:
    return np.random.default_rng(0).integers(4, CONFIG.vocab_size, (24, ARGS.block_size))


def _log(folder) -> dict:
    return json.loads((folder / "trainer_log.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from opt_torch.training import train_causal_lm

    tmp = tmp_path_factory.mktemp("fsdp")
    info, _ = torchrun("fsdp_check.py", [str(tmp)])
    one = make_model()
    train_causal_lm(one, training_blocks(), args(output_dir=str(tmp / "one")), log=None)
    return tmp, info


def test_fsdp_loss_curve_matches_one_process(runs):
    tmp, _ = runs
    one, fsdp = _log(tmp / "one"), _log(tmp / "fsdp")
    assert len(fsdp["losses"]) == ARGS.max_steps
    np.testing.assert_allclose(fsdp["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(fsdp["grad_norms"], one["grad_norms"], rtol=1e-4)
    assert max(one["grad_norms"]) > ARGS.max_grad_norm  # clipping was active
    assert fsdp["tokens"] == one["tokens"]


def test_fsdp_saves_a_normal_folder(runs):
    from opt_torch import OPTForCausalLM

    tmp, info = runs
    one = OPTForCausalLM.from_pretrained(tmp / "one")
    fsdp = OPTForCausalLM.from_pretrained(tmp / "fsdp")
    for (name, a), (_, b) in zip(one.state_dict().items(), fsdp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp / "fsdp" / "checkpoint-2" / "model.safetensors").is_file()
    full = sum(p.numel() * 4 for p in one.parameters())
    assert all(n < 0.6 * full for n in info["local_bytes_per_rank"]), (info, full)


def test_fsdp_resumes_from_sharded_checkpoint(runs):
    tmp, _ = runs
    np.testing.assert_allclose(_log(tmp / "resumed")["losses"], _log(tmp / "fsdp")["losses"], rtol=1e-6)
