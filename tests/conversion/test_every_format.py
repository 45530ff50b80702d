"""Every backend and the reference read every Hugging Face-written format (every cell of
the format table "yes"): logits match Hugging Face's on the golden checkpoints, whichever file they come from. The
reference is checked here; the three backends in tests/common/test_io.py (bit-exact tensors from
every file, then Hugging Face's logits)."""

from __future__ import annotations

import pytest

from opt_core.reference import ReferenceOPTForCausalLM
from tests.golden import hf_golden
from tests.variants import TOLERANCE, relative_error

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]
FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_the_reference_reads_every_hf_written_format(variant):
    """The three backends read every format in tests/common/test_io.py
    (`test_hf_written_checkpoints_match_hf_logits`: every file, bit-exact tensors, HF's logits)."""
    g = hf_golden(variant)
    for fmt in FORMATS:
        logits = ReferenceOPTForCausalLM.from_pretrained(g.folder, format=fmt)(g.ids, g.mask).logits
        err = relative_error(logits, g.torch["logits"], g.mask)
        assert err < TOLERANCE["float32"], (fmt, err)


def test_converted_msgpack_verifies_in_every_backend(tmp_path, capsys):
    """The README's `opt convert B m --to flax-msgpack && opt verify m`: every row passes."""
    from opt_cli.main import main
    from tests.conversion.helpers import write_hf_checkpoint
    from tests.variants import VARIANTS

    write_hf_checkpoint(tmp_path / "b", VARIANTS["pre_ln"])
    assert main(["convert", str(tmp_path / "b"), str(tmp_path / "m"), "--to", "flax-msgpack", "--no-progress"]) == 0
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[[5, 6, 7, 8]]")
    rc = main(["verify", str(tmp_path / "m"), "--backends", "torch,flax", "--prompts", str(prompts),
               "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "SKIPPED" not in out.upper() and "ERROR" not in out.upper(), out


def test_transformers5_dtype_key_and_file_modes(tmp_path):
    """`dtype` (transformers 5) is read like `torch_dtype`; saving writes one dtype; files are 0644."""
    import json
    import os

    import torch

    import opt_torch
    from tests.conversion.helpers import write_hf_checkpoint
    from tests.variants import VARIANTS

    write_hf_checkpoint(tmp_path / "v5", VARIANTS["pre_ln"])
    cfg = json.loads((tmp_path / "v5" / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float16"
    (tmp_path / "v5" / "config.json").write_text(json.dumps(cfg))
    model = opt_torch.OPTForCausalLM.from_pretrained(tmp_path / "v5", dtype="auto")
    assert model.dtype == torch.float16
    old = os.umask(0o022)
    try:
        written = model.save_pretrained(tmp_path / "out", formats=["safetensors", "bin", "tf-h5", "flax-msgpack"])
    finally:
        os.umask(old)
    assert [p.name for p in written] == ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
                                         "flax_model.msgpack", "generation_config.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["torch_dtype"] == "float16" and saved.get("dtype", "float16") == "float16"
