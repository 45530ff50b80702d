"""The training entry points every backend has, written once over the `backend` fixture: the
causal-LM loss falls (with gradient accumulation, and remat/checkpointing where the backend has it),
the bookkeeping of opt_core.training (evaluations, checkpoints, the log, the schedule) holds, a
reloaded checkpoint evaluates the same, and classification / QA learn a synthetic task. What one
backend alone has stays in tests/training/test_<backend>_training.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from opt_core.data import TextDataset
from opt_core.params import Head
from opt_core.training_args import TrainingArguments
from tests.training.tasks import TINY_TRAIN, affine_blocks, classification_task, qa_task

ARGS = TrainingArguments(max_steps=12, batch_size=8, block_size=32, learning_rate=1e-2, warmup_steps=2,
                         log_every=100)


def test_causal_lm_loss_falls_and_eval_matches(backend, tmp_path):
    training = backend.training
    blocks = affine_blocks()
    model = backend.build(TINY_TRAIN, Head.CAUSAL_LM)
    before = training.evaluate_causal_lm(model, blocks[:16])
    args = ARGS.replace(batch_size=4, gradient_accumulation_steps=2, gradient_checkpointing=backend.name != "tf",
                        output_dir=str(tmp_path / "run"), save_every=5, eval_every=6)
    res = training.train_causal_lm(model, TextDataset(blocks), args, eval_data=blocks[:16], log=None)
    assert res.steps == 12 and len(res.learning_rates) == 12 and res.tokens == 12 * 8 * 32
    assert res.losses[-1] < res.losses[0] - 0.5, res.losses  # 4.86 -> ~3.9
    assert [e["step"] for e in res.evals] == [6, 12]
    after = res.evals[-1]
    assert after["loss"] < before["loss"] - 0.5
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert after["tokens"] == 16 * 31
    assert res.learning_rates == pytest.approx([args.learning_rate_at(s) for s in range(12)])
    out = tmp_path / "run"
    for folder in (out, out / "checkpoint-5", out / "checkpoint-10"):
        assert (folder / "model.safetensors").is_file() and (folder / "training_args.json").is_file()
    log = json.loads((out / "trainer_log.json").read_text())
    assert log["losses"] == pytest.approx(res.losses)
    again = training.evaluate_causal_lm(backend.load(Head.CAUSAL_LM, out), blocks[:16])
    assert again["loss"] == pytest.approx(after["loss"], rel=1e-5)


def test_sequence_classification_and_qa_learn(backend):
    training = backend.training
    args = ARGS.replace(max_steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=4)
    cls = backend.build(TINY_TRAIN.replace(num_labels=2), Head.SEQUENCE_CLASSIFICATION)
    res = training.train_sequence_classification(cls, classification_task(), args, log=None)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.2, res.losses
    qa = backend.build(TINY_TRAIN, Head.QUESTION_ANSWERING)
    res = training.train_question_answering(qa, qa_task(), args.replace(max_steps=30), log=None)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.5, res.losses
    data = qa_task()
    del data["end_positions"]
    with pytest.raises(ValueError, match="lacks end_positions"):
        training.train_question_answering(qa, data, args, log=None)
