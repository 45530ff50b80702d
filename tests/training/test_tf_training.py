"""opt_tf.training (Keras compile/fit): the causal-LM loss falls (with Keras' gradient
accumulation), and the classification / QA entry points learn a synthetic task."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core.data import TextDataset
from opt_core.training_args import TrainingArguments
from tests.training.tasks import TINY_TRAIN, affine_blocks, classification_task, qa_task

pytestmark = pytest.mark.tf

ARGS = TrainingArguments(max_steps=12, batch_size=8, block_size=32, learning_rate=1e-2, warmup_steps=2,
                         log_every=100)


def test_causal_lm_loss_falls_with_accumulation(tmp_path):
    import keras

    from opt_tf import OPTForCausalLM
    from opt_tf.training import evaluate_causal_lm, train_causal_lm

    blocks = affine_blocks()
    keras.utils.set_random_seed(0)
    model = OPTForCausalLM(TINY_TRAIN)
    args = ARGS.replace(batch_size=4, gradient_accumulation_steps=2, output_dir=str(tmp_path))
    res = train_causal_lm(model, TextDataset(blocks), args, eval_data=blocks[:16], log=None)
    assert res.steps == 12 and res.tokens == 12 * 8 * 32
    assert res.losses[-1] < res.losses[0] - 0.5, res.losses
    reloaded = OPTForCausalLM.from_pretrained(tmp_path)
    assert evaluate_causal_lm(reloaded, blocks[:16])["loss"] == pytest.approx(res.evals[-1]["loss"], rel=1e-5)


def test_sequence_classification_and_qa_learn():
    import keras

    from opt_tf import OPTForQuestionAnswering, OPTForSequenceClassification
    from opt_tf.training import train_question_answering, train_sequence_classification

    keras.utils.set_random_seed(0)
    args = ARGS.replace(max_steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=4)
    cls = OPTForSequenceClassification(TINY_TRAIN)
    res = train_sequence_classification(cls, classification_task(), args, log=None)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.2, res.losses
    qa = OPTForQuestionAnswering(TINY_TRAIN)
    res = train_question_answering(qa, qa_task(), args.replace(max_steps=30), log=None)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.5, res.losses
