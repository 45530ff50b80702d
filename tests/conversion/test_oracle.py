"""Converted checkpoints load in Hugging Face 4.57.6 and give Hugging Face's own logits.

Sources are the oracle's own files (tests.golden: written by Hugging Face in all four formats), so
this also checks that checkpoints written by Hugging Face convert. Each output format is produced
from a different Hugging Face-written format, then all are loaded by the matching HF class: one
oracle call for safetensors (torch) + tf_model.h5 (TF) + flax_model.msgpack (Flax) together, one for
pytorch_model.bin (torch). Results are cached by folder content, and conversion is deterministic.
"""

from __future__ import annotations

import shutil

import pytest

from conversion import convert
from tests.conversion.helpers import assert_same_tensors, read_canonical
from tests.golden import hf_golden
from tests.oracle import oracle_run
from tests.variants import TOLERANCE, relative_error

pytestmark = [pytest.mark.oracle, pytest.mark.torch]

# output format -> the Hugging Face-written format it is converted from
SOURCES = {"safetensors": "bin", "tf-h5": "flax-msgpack", "flax-msgpack": "tf-h5", "bin": "safetensors"}


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_outputs_load_in_hugging_face_with_the_same_logits(tmp_path, variant):
    g = hf_golden(variant)
    want = read_canonical(g.folder, "safetensors")
    for to, src_fmt in SOURCES.items():
        report = convert(g.folder, tmp_path / to, to=to, src_format=src_fmt, progress=False, verify=True)
        assert report.verify.ok, report.summary()
        got = read_canonical(tmp_path / to, to)
        if "lm_head.weight" in got:  # HF's .bin stores the tied head; it is carried along unchanged
            assert got.pop("lm_head.weight").tobytes() == want["decoder.embed_tokens.weight"].tobytes()
        assert_same_tensors(got, want)

    combined = tmp_path / "combined"  # one folder, one oracle call for three frameworks
    shutil.copytree(tmp_path / "safetensors", combined)
    shutil.copy(tmp_path / "tf-h5" / "tf_model.h5", combined)
    shutil.copy(tmp_path / "flax-msgpack" / "flax_model.msgpack", combined)
    base = {"input_ids": g.ids, "attention_mask": g.mask}
    torch_run, tf_run, flax_run = oracle_run(
        combined, [{"framework": f, **base} for f in ("torch", "tf", "flax")]
    )
    (bin_run,) = oracle_run(tmp_path / "bin", [{"framework": "torch", **base}])
    tol = TOLERANCE["float32"]
    for name, got, ref in [
        ("safetensors/torch", torch_run, g.torch),
        ("bin/torch", bin_run, g.torch),
        ("tf-h5/tf", tf_run, g.tf),
        ("flax-msgpack/flax", flax_run, g.flax),
    ]:
        err = relative_error(got["logits"], ref["logits"], g.mask)
        assert err <= tol, f"{variant} {name}: relative error {err:.2e} > {tol:.0e}"
