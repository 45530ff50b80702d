"""Checkpoints written by Hugging Face, converted, load in this project's three backends and give
Hugging Face's logits. Each backend reads the formats its `from_pretrained` supports (torch:
safetensors and bin; tf: safetensors and tf-h5; flax: safetensors and flax-msgpack); every output is
converted from a different Hugging Face-written format."""

from __future__ import annotations

import numpy as np
import pytest

from conversion import convert
from tests.golden import hf_golden
from tests.variants import TOLERANCE, relative_error

VARIANTS = ["pre_ln", "post_ln_proj"]


def _converted(tmp_path, variant, to, src_format):
    g = hf_golden(variant)
    out = tmp_path / f"{variant}-{to}"
    convert(g.folder, out, to=to, src_format=src_format, progress=False)
    return g, out


def _check(g, logits, name):
    err = relative_error(np.asarray(logits), g.torch["logits"], g.mask)
    assert err <= TOLERANCE["float32"], f"{name}: relative error {err:.2e}"


@pytest.mark.torch
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_loads_converted_outputs(tmp_path, variant):
    import torch

    from opt_torch import OPTForCausalLM

    for to, src in (("safetensors", "flax-msgpack"), ("bin", "tf-h5")):
        g, folder = _converted(tmp_path, variant, to, src)
        model = OPTForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(g.ids), attention_mask=torch.from_numpy(g.mask))
        _check(g, out.logits.float().numpy(), f"opt_torch {to}")


@pytest.mark.tf
@pytest.mark.parametrize("variant", VARIANTS)
def test_tf_backend_loads_converted_outputs(tmp_path, variant):
    from opt_tf import OPTForCausalLM

    for to, src in (("safetensors", "tf-h5"), ("tf-h5", "bin")):
        g, folder = _converted(tmp_path, variant, to, src)
        model = OPTForCausalLM.from_pretrained(folder, format=to)
        out = model(input_ids=g.ids, attention_mask=g.mask)
        _check(g, np.asarray(out.logits), f"opt_tf {to}")


@pytest.mark.flax
@pytest.mark.parametrize("variant", VARIANTS)
def test_flax_backend_loads_converted_outputs(tmp_path, variant):
    from opt_flax import OPTForCausalLM

    for to, src in (("safetensors", "bin"), ("flax-msgpack", "safetensors")):
        g, folder = _converted(tmp_path, variant, to, src)
        model = OPTForCausalLM.from_pretrained(folder, format=to)
        out = model(input_ids=g.ids, attention_mask=g.mask)
        _check(g, np.asarray(out.logits), f"opt_flax {to}")
