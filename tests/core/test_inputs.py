"""Bad inputs get a clear error that names the problem (checked through the reference model)."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core.checkpoint import CheckpointError, save_numpy_safetensors
from opt_core.reference import ReferenceOPTForCausalLM, random_parameters
from tests.variants import VARIANTS


@pytest.fixture(scope="module")
def ref():
    cfg = VARIANTS["pre_ln"]
    return ReferenceOPTForCausalLM(cfg, random_parameters(cfg))


def test_token_outside_vocab(ref):
    with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary \[0, 128\)"):
        ref(np.array([[2, 5, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        ref(np.array([[2, -1]]))


def test_sequence_longer_than_positions(ref):
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than max_position_embeddings \\(64\\)"):
        ref(np.full((1, 65), 5))


def test_mask_of_wrong_shape(ref):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\); expected \(1, 4\)"):
        ref(np.array([[2, 5, 6, 7]]), np.ones((1, 3), int))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ref(np.array([[2, 5]]), np.array([[1, 2]]))


def test_ids_shape_and_dtype(ref):
    with pytest.raises(ValueError, match="2-D"):
        ref(np.array([2, 5]))
    with pytest.raises(ValueError, match="integers"):
        ref(np.array([[2.0, 5.0]]))
    with pytest.raises(ValueError, match="empty"):
        ref(np.zeros((1, 0), np.int64))


def _save(folder, cfg, params):
    cfg.save_pretrained(folder)
    save_numpy_safetensors(folder, {("model." + k if k.startswith("decoder.") else k): v for k, v in params.items()
                                    if k != "lm_head.weight"})


def test_truncated_safetensors(tmp_path):
    cfg = VARIANTS["pre_ln"]
    _save(tmp_path, cfg, random_parameters(cfg))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ReferenceOPTForCausalLM.from_pretrained(tmp_path)


def test_config_disagrees_with_tensors(tmp_path):
    cfg = VARIANTS["pre_ln"]
    _save(tmp_path, cfg, random_parameters(cfg))
    cfg.replace(ffn_dim=48).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"fc1.weight is \[64, 32\], the config implies \[48, 32\]"):
        ReferenceOPTForCausalLM.from_pretrained(tmp_path)


def test_no_weights(tmp_path):
    VARIANTS["pre_ln"].save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no OPT weights"):
        ReferenceOPTForCausalLM.from_pretrained(tmp_path)
