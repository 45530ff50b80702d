"""One loss per head, the same in every backend and in training: `opt_<backend>.losses` against the
NumPy reference (`opt_core.losses`, Hugging Face 4.57.6's rules) for each `problem_type` (explicit
and inferred) and for QA positions outside the sequence; then one training step of each backend on
the same weights and data reports the same loss (the heads' own, so `problem_type` and the QA clamp
reach training too).

Tolerance: `opt_verify.tolerances.LOSS` (1e-5 nats; float32 losses against a float64 reference).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from opt_core import losses as reference
from opt_core.training_args import TrainingArguments
from opt_verify.tolerances import LOSS
from tests.training.tasks import TINY_TRAIN, classification_task, qa_task

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]

TOLERANCE = LOSS.nats
RNG = np.random.default_rng(0)
LOGITS_2 = RNG.normal(size=(4, 2)).astype(np.float32)
LOGITS_1 = RNG.normal(size=(4, 1)).astype(np.float32)
LM_LOGITS = RNG.normal(size=(2, 5, 7)).astype(np.float32)
START, END = RNG.normal(size=(2, 2, 6))  # [B = 2, T = 6] each.astype(np.float32)

# (problem_type, num_labels, logits, labels, the problem the reference must resolve to)
CLASSIFICATION_CASES = {
    "regression": ("regression", 2, LOGITS_2, RNG.normal(size=(4, 2)).astype(np.float32), "regression"),
    "regression_inferred": (None, 1, LOGITS_1, RNG.normal(size=4).astype(np.float32), "regression"),
    "single_label": ("single_label_classification", 2, LOGITS_2, np.array([0, 1, 1, 0]), None),
    "single_label_inferred": (None, 2, LOGITS_2, np.array([0, 1, -100, 0]), "single_label_classification"),
    "single_label_int32": (None, 2, LOGITS_2, np.array([1, 1, 0, 0], np.int32), "single_label_classification"),
    "multi_label": ("multi_label_classification", 2, LOGITS_2, np.array([[1, 0], [0, 1], [1, 1], [0, 0]]), None),
    "multi_label_inferred": (None, 2, LOGITS_2, np.array([[1.0, 0], [0, 1], [1, 1], [0, 0]], np.float32),
                             "multi_label_classification"),
}


def _backends():
    import jax.numpy as jnp
    import tensorflow as tf
    import torch

    from opt_flax import losses as flax_losses
    from opt_tf import losses as tf_losses
    from opt_torch import losses as torch_losses

    return {
        "torch": (torch_losses, lambda x: torch.from_numpy(np.asarray(x))),
        "tf": (tf_losses, tf.convert_to_tensor),
        "flax": (flax_losses, jnp.asarray),
    }


def test_the_three_loss_modules_have_the_same_functions_in_the_same_order():
    import inspect

    names = {
        name: [n for n, f in vars(mod).items()
               if inspect.isfunction(f) and f.__module__ == mod.__name__ and not n.startswith("_")]
        for name, (mod, _) in _backends().items()
    }
    assert names["torch"] == names["tf"] == names["flax"], names


@pytest.mark.parametrize("case", sorted(CLASSIFICATION_CASES))
def test_sequence_classification_loss_by_problem_type(case):
    problem, num_labels, logits, labels, resolved = CLASSIFICATION_CASES[case]
    config = TINY_TRAIN.replace(num_labels=num_labels, problem_type=problem)
    assert reference.problem_type(config, labels.dtype.name) == (resolved or problem)
    want = reference.sequence_classification_loss(logits, labels, config)
    for name, (losses, to) in _backends().items():
        got = float(losses.sequence_classification_loss(to(logits), to(labels), config))
        assert abs(got - want) < TOLERANCE, (name, got, want)


@pytest.mark.parametrize("start, end", [
    ([0, 3], [5, 2]),
    ([-3, 9], [6, 2]),  # clamped to 0 and to T = 6; T is ignored
    ([6, 1], [100, 2]),  # a row whose start and end are both cut off
    ([7, 8], [9, 6]),  # nothing left to count: NaN, as Hugging Face's mean over no targets
])
def test_question_answering_loss_clamps_like_hugging_face(start, end):
    start, end = np.array(start), np.array(end)
    want = reference.question_answering_loss(START, END, start, end)
    assert np.isfinite(want) == (min(start) < 6 or min(end) < 6)
    for name, (losses, to) in _backends().items():
        got = float(losses.question_answering_loss(to(START), to(END), to(start), to(end)))
        assert abs(got - want) < TOLERANCE or (np.isnan(got) and np.isnan(want)), (name, got, want)


def test_causal_lm_loss_mean_and_sum():
    labels = RNG.integers(0, 7, (2, 5))
    labels[0, 3] = labels[1, 1] = -100
    want = reference.causal_lm_loss(LM_LOGITS, labels)
    counted = int((labels[:, 1:] != -100).sum())
    for name, (losses, to) in _backends().items():
        assert abs(float(losses.causal_lm_loss(to(LM_LOGITS), to(labels))) - want) < TOLERANCE, name
        total = float(losses.causal_lm_loss(to(LM_LOGITS), to(labels), reduction="sum"))
        assert abs(total - want * counted) < TOLERANCE * counted, name


def _models(tmp_path, cls_name, config):
    """torch, TF and Flax `cls_name` models holding the same random weights."""
    import importlib

    import torch

    torch.manual_seed(0)
    getattr(importlib.import_module("opt_torch"), cls_name)(config).save_pretrained(tmp_path)
    return {b: getattr(importlib.import_module(f"opt_{b}"), cls_name).from_pretrained(tmp_path)
            for b in ("torch", "tf", "flax")}


def _cases():
    """Regression over two labels (torch and Flax used to train it as multi-label) and QA with
    positions outside the rows (they used to index out of range)."""
    cls = classification_task(n=8)
    cls["labels"] = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    qa = qa_task(n=8)
    qa["start_positions"][:2] = -4  # clamped to 0
    qa["end_positions"][:3] = 99  # clamped to T and ignored
    return [
        ("OPTForSequenceClassification", TINY_TRAIN.replace(num_labels=2, problem_type="regression"), cls,
         "train_sequence_classification", "_classification_loss"),
        ("OPTForQuestionAnswering", TINY_TRAIN, qa, "train_question_answering", "_question_answering_loss"),
    ]


def test_training_losses_are_the_heads_losses_in_every_backend(tmp_path):
    """What each backend's training loop differentiates, on one batch, equals the head's `.loss`
    and the other backends' (TF: what `fit`'s train_step computes)."""
    import jax.numpy as jnp
    import torch

    from opt_flax import training as flax_training
    from opt_tf.training import _model_inputs
    from opt_torch import training as torch_training

    for cls_name, config, data, _, loss_fn in _cases():
        models = _models(tmp_path / cls_name, cls_name, config)
        labels = {k: v for k, v in data.items() if k not in ("input_ids", "attention_mask")}
        x = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
        got = {
            "torch": float(getattr(torch_training, loss_fn)(
                models["torch"], {k: torch.from_numpy(v) for k, v in data.items()})),
            "flax": float(getattr(flax_training, loss_fn)(
                models["flax"], {k: jnp.asarray(v) for k, v in data.items()})),
            "tf": float(models["tf"](**_model_inputs(models["tf"], (x, labels))).loss),
        }
        assert all(np.isfinite(v) for v in got.values()), got
        assert max(got.values()) - min(got.values()) < TOLERANCE, (cls_name, got)


@pytest.mark.slow
def test_one_training_step_reports_the_same_loss_in_every_backend(tmp_path):
    args = TrainingArguments(max_steps=1, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_every=100)
    for cls_name, config, data, train_name, _ in _cases():
        models = _models(tmp_path / cls_name, cls_name, config)
        got = {}
        for backend, model in models.items():
            train = getattr(importlib.import_module(f"opt_{backend}.training"), train_name)
            got[backend] = train(model, data, args, log=None).losses[0]
        assert all(np.isfinite(v) for v in got.values()), got
        assert max(got.values()) - min(got.values()) < TOLERANCE, (cls_name, got)
