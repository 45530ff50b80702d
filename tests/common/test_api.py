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


# ---------------------------------------------------------------- the same refusal in every backend
def _tiny(**overrides):
    from opt_core import OPTConfig

    return OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     max_position_embeddings=32, **overrides)


def _message(call) -> str:
    """The ValueError `call` raises. Keras wraps an error raised inside a layer's `call` in its own
    lines ("Exception encountered when calling ... Arguments received by ..."), around the
    message: those lines are cut off here, so what remains is the message itself."""
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    if text.startswith("Exception encountered when calling"):
        text = text.split("\n\n")[1].removeprefix("\x1b[1m").removesuffix("\x1b[0m")
    return text


def test_classifying_a_batch_without_a_pad_token_is_one_refusal_everywhere():
    """With `pad_token_id=None` a batch of two rows cannot be pooled: the reference and all three
    backends refuse it with the one message of `opt_core.masks.check_pooling_pad_token` (Flax used
    to pool the last column silently); one row still pools its last position."""
    import numpy as np

    from opt_core.masks import check_pooling_pad_token
    from opt_core.params import Head
    from opt_core.reference import ReferenceOPTForSequenceClassification, random_parameters
    from tests.backends import get_backend

    config = _tiny(pad_token_id=None, num_labels=3)
    params = random_parameters(config, Head.SEQUENCE_CLASSIFICATION, seed=0)
    batch = np.array([[5, 6, 7], [8, 9, 10]])
    expected = _message(lambda: check_pooling_pad_token(None, 2))
    reference = ReferenceOPTForSequenceClassification(config, params)
    assert _message(lambda: reference(batch)) == expected
    one_row = reference(batch[:1]).logits
    for name in BACKENDS:
        b = get_backend(name)
        model = b.build(config, Head.SEQUENCE_CLASSIFICATION, params)
        assert _message(lambda b=b, model=model: b.forward(model, batch)) == expected, name
        np.testing.assert_allclose(b.forward(model, batch[:1])["logits"], one_row, rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_saving_a_quantized_model_is_one_refusal_everywhere(tmp_path):
    """`save_pretrained` of a quantized model is refused before anything is written, with the one
    message of `opt_core.quantization.refuse_quantized_save` (TF and Flax used to fail with a
    KeyError from inside the writer)."""
    from opt_core.quantization import refuse_quantized_save
    from tests.backends import get_backend

    class Quantized:
        quantization = {"mode": "int8"}

    expected = _message(lambda: refuse_quantized_save(Quantized()))
    for name in BACKENDS:
        b = get_backend(name)
        model = b.module("quantize").quantize_model(b.build(_tiny()), "int8")
        folder = tmp_path / name
        assert _message(lambda model=model, folder=folder: model.save_pretrained(folder)) == expected, name
        assert not folder.exists() or not any(folder.iterdir()), name


# ---------------------------------------------------------------- model calls: one parameter order
TASK_INPUTS = ("labels", "start_positions", "end_positions")


@pytest.mark.parametrize("class_name", list(MODEL_CLASS_NAMES.values()))
def test_model_calls_take_the_same_arguments_in_the_same_order(class_name):
    """A model call (torch `forward`, TF `call`, Flax `__call__`) takes the same parameters in the
    same places up to its task inputs (labels / start and end positions), so a positional call
    means the same everywhere; after that, the parameters all three have keep one relative order,
    and each backend's own ones are those listed (with why) in tests/common/test_mirrors.py."""
    from tests.common.test_mirrors import CALL_METHOD, OWN_CALL_PARAMETERS

    params = {}
    for b in BACKENDS:
        cls = getattr(importlib.import_module(f"opt_{b}"), class_name)
        params[b] = [p for p in inspect.signature(getattr(cls, CALL_METHOD[b])).parameters if p != "self"]
    torch_params = params["torch"]
    cut = max((torch_params.index(p) for p in TASK_INPUTS if p in torch_params), default=None)
    if cut is None:  # OPTModel: up to past_key_values
        cut = torch_params.index("past_key_values")
    prefix = torch_params[: cut + 1]
    for b, names in params.items():
        assert names[: cut + 1] == prefix, (class_name, b, names)
    shared = [p for p in torch_params if all(p in names for names in params.values())]
    for b, names in params.items():
        assert [p for p in names if p in shared] == shared, (class_name, b, names)
        own = set(names) - set(shared)
        assert own <= OWN_CALL_PARAMETERS[b], (class_name, b, own - OWN_CALL_PARAMETERS[b])
