"""`opt_core.quantization`: the one check of `quantize=` that every backend's from_pretrained uses."""

import pytest

from opt_core.quantization import QUANTIZE_MODES, check_quantize


@pytest.mark.parametrize("backend", sorted(QUANTIZE_MODES))
def test_offered_modes_and_none_pass(backend):
    assert check_quantize(None, backend) is None
    assert all(check_quantize(mode, backend) == mode for mode in QUANTIZE_MODES[backend])


def test_a_mode_another_backend_has_names_it():
    with pytest.raises(ValueError, match=r"quantize='int4' is opt_torch only; opt_flax has \['int8', 'w8a8'\]"):
        check_quantize("int4", "flax")


def test_an_unknown_mode_lists_the_backends_modes():
    want = r"quantize='int3' is unknown; expected None or one of \['int8', 'int4', 'w8a8'\]"
    with pytest.raises(ValueError, match=want):
        check_quantize("int3", "torch")
