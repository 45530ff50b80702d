"""`from_pretrained`'s odd arguments get one clear error in every backend: a weights file where the
folder belongs, `config=` as a dict (accepted, like config.json's content) or of a wrong type, a dtype
the backend would silently compute in another one, a quantization the backend cannot run in a dtype."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import OPTConfig, bundled

FOLDER = bundled.path()


def test_a_weights_file_is_not_a_model_folder(backend):
    with pytest.raises(ValueError, match=r"model.safetensors is a weights file; from_pretrained takes the model "
                                         r"folder that holds it and config.json \(.*opt-shakespeare\)"):
        backend.package.OPTForCausalLM.from_pretrained(FOLDER / "model.safetensors")


def test_config_as_a_dict_or_a_wrong_type(backend):
    cls = backend.package.OPTForCausalLM
    config = OPTConfig.from_pretrained(FOLDER)
    model = cls.from_pretrained(FOLDER, config=config.to_dict())
    assert model.config == config
    with pytest.raises(TypeError, match="config= must be an OPTConfig, a dict like config.json or a path, got int"):
        cls.from_pretrained(FOLDER, config=42)
    with pytest.raises(ValueError,
                       match=r"config= \(a dict\): OPTConfig.init_std must be a number in \[0, 10\], got inf"):
        cls.from_pretrained(FOLDER, config={**config.to_dict(), "init_std": float("inf")})


def test_float64_is_refused_where_it_would_silently_be_float32(backend):
    cls = backend.package.OPTForCausalLM
    if backend.name == "torch":  # torch computes in float64
        model = cls.from_pretrained(FOLDER, dtype="float64")
        assert str(next(model.parameters()).dtype) == "torch.float64"
        return
    with pytest.raises(ValueError, match="float64"):
        cls.from_pretrained(FOLDER, dtype="float64")


@pytest.mark.tf
def test_tf_quantizes_float32_models_only():
    """opt_tf's restriction alone (torch and Flax quantize half-precision models): not parametrized."""
    from opt_tf import OPTForCausalLM

    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match=rf"quantize='int8' in opt_tf needs dtype float32 .*not {dtype}"):
            OPTForCausalLM.from_pretrained(FOLDER, dtype=dtype, quantize="int8")
    model = OPTForCausalLM.from_pretrained(FOLDER, quantize="int8")
    assert np.isfinite(np.asarray(model(input_ids=np.array([[2, 5, 6]])).logits)).all()
