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


def _loss_of(folder, blocks: np.ndarray) -> float:
    """The causal LM loss of the model saved in `folder` on `blocks`, computed here in one process
    (not read from any log)."""
    from opt_torch import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ids = torch.from_numpy(blocks)
        return float(model(ids, labels=ids).loss)


def test_fsdp_resumes_from_sharded_checkpoint(runs):
    """A run resumed at step 2 from the sharded checkpoint (into a differently initialised model)
    ends where the uninterrupted run ends. The resumed log's first two losses are the checkpoint's,
    copied, so they prove nothing and are not what is compared: the losses it computed itself
    (steps 3 and 4), and the loss of its final model recomputed here on held-out blocks."""
    tmp, _ = runs
    steps_done = 2
    checkpoint, resumed, fsdp = (_log(tmp / "fsdp" / f"checkpoint-{steps_done}"), _log(tmp / "resumed"),
                                 _log(tmp / "fsdp"))
    assert resumed["losses"][:steps_done] == checkpoint["losses"]  # carried over, not recomputed
    assert len(resumed["losses"]) == ARGS.max_steps
    np.testing.assert_allclose(resumed["losses"][steps_done:], fsdp["losses"][steps_done:], rtol=1e-6)

    held_out = np.random.default_rng(1).integers(4, CONFIG.vocab_size, (4, ARGS.block_size))
    final = _loss_of(tmp / "fsdp", held_out)
    assert _loss_of(tmp / "resumed", held_out) == pytest.approx(final, rel=1e-6)
    # The comparison can fail: the checkpoint's model and the fresh one the resume started from differ.
    assert abs(_loss_of(tmp / "fsdp" / f"checkpoint-{steps_done}", held_out) - final) > 1e-4
    fresh = make_model(seed=1)
    fresh.save_pretrained(tmp / "fresh")
    assert abs(_loss_of(tmp / "fresh", held_out) - final) > 1e-4
