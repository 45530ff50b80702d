"""One signature per public method on every backend: `from_pretrained`, `save_pretrained` and
`generate` read the same in `opt_torch`, `opt_tf` and `opt_flax` (names, order, kinds, defaults and
annotations; `generate` returns each framework's own int64 array), and carry the one shared
docstring; only the line naming a backend's own options differs. The per-backend contract of
`generate` is tests/generation/test_contract.py."""

from __future__ import annotations

import importlib
import inspect

import pytest

from opt_core.checkpoint import FROM_PRETRAINED_DOC, SAVE_PRETRAINED_DOC
from opt_core.generation_config import GENERATE_DOC
from tests.backends import BACKENDS, MODEL_CLASS_NAMES

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]
SHARED = ("name_or_path", "dtype", "config", "format", "revision", "allow_non_finite", "quantize")


@pytest.mark.parametrize("class_name", list(MODEL_CLASS_NAMES.values()))
def test_one_signature_per_method_on_every_backend(class_name):
    classes = {b: getattr(importlib.import_module(f"opt_{b}"), class_name) for b in BACKENDS}
    methods = ["from_pretrained", "save_pretrained"] + (["generate"] if class_name == "OPTForCausalLM" else [])
    for method in methods:
        signatures = {b: inspect.signature(getattr(cls, method)) for b, cls in classes.items()}
        if method == "generate":  # returns the framework's int64 array (torch.Tensor, tf.Tensor, NumPy)
            signatures = {b: s.replace(return_annotation=inspect.Signature.empty) for b, s in signatures.items()}
        assert len({str(s) for s in signatures.values()}) == 1, (class_name, method, signatures)
        assert len(set(signatures.values())) == 1, (class_name, method)
    load = inspect.signature(classes["torch"].from_pretrained).parameters
    assert tuple(load)[: len(SHARED)] == SHARED and tuple(load)[-1] == "backend_options"
    assert tuple(inspect.signature(classes["torch"].save_pretrained).parameters) == (
        "self", "folder", "max_shard_size", "formats", "backend_options")
    for b, cls in classes.items():
        assert inspect.getdoc(cls.from_pretrained).startswith(inspect.cleandoc(FROM_PRETRAINED_DOC)), b
        assert inspect.getdoc(cls.save_pretrained).startswith(inspect.cleandoc(SAVE_PRETRAINED_DOC)), b
        if "generate" in methods:
            assert inspect.getdoc(cls.generate) == inspect.cleandoc(GENERATE_DOC), b


def test_an_option_of_another_backend_is_a_type_error(tmp_path):
    """A backend's own option (torch's `device`) is refused by name elsewhere, not ignored."""
    from opt_core import OPTConfig

    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=32)
    from tests.backends import get_backend

    get_backend("torch").build(config).save_pretrained(tmp_path)
    for b in ("tf", "flax"):
        with pytest.raises(TypeError, match="device"):
            importlib.import_module(f"opt_{b}").OPTForCausalLM.from_pretrained(tmp_path, device="cpu")
        with pytest.raises(TypeError, match="device"):
            get_backend(b).build(config).save_pretrained(tmp_path / b, device="cpu")
