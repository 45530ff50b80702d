"""What only opt_torch's io has: `torch.dtype` and device arguments, the loading peak RSS, and
Hugging Face torch loading a sharded folder we wrote. Everything the three backends share (Hugging
Face-written folders, key variants, the tied lm_head, sharding, strict accounting, refused pickles,
missing files, task heads, dtypes, written paths, round trips) is in tests/common/test_io.py."""

from __future__ import annotations

import pytest
import torch

from opt_core import Head
from opt_torch import OPTForCausalLM
from tests.oracle import oracle_run
from tests.torch.helpers import model_and_reference
from tests.variants import TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.torch


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def test_torch_dtype_objects_and_device(tmp_path):
    """`dtype` also takes a `torch.dtype`, `device` places every parameter, every parameter
    (LayerNorm included) is stored in the one dtype asked for, and the logits of each dtype are
    within its tolerance of the float64 reference."""
    config = VARIANTS["pre_ln"]
    lm, ref = model_and_reference(config, Head.CAUSAL_LM)
    lm.save_pretrained(tmp_path)
    ids, mask = left_padded_batch(config.vocab_size)
    for dtype in ("bfloat16", torch.float16, "auto"):
        model = OPTForCausalLM.from_pretrained(tmp_path, dtype=dtype, device="cpu")
        want = torch.float32 if dtype == "auto" else getattr(torch, str(dtype).removeprefix("torch."))
        assert {p.dtype for p in model.parameters()} == {want}
        assert all(p.device.type == "cpu" for p in model.parameters())
        name = str(want).removeprefix("torch.")
        assert relative_error(_logits(model, ids, mask), ref(ids, mask).logits, mask) < TOLERANCE[name]


@pytest.mark.oracle
def test_hugging_face_loads_what_we_save(tmp_path):
    config = VARIANTS["post_ln_proj"]
    ids, mask = left_padded_batch(config.vocab_size)
    lm, _ = model_and_reference(config, Head.CAUSAL_LM, seed=7)
    lm.save_pretrained(tmp_path / "lm", max_shard_size=30_000)
    [hf] = oracle_run(tmp_path / "lm", [{"framework": "torch", "input_ids": ids, "attention_mask": mask}])
    assert relative_error(_logits(lm, ids, mask), hf["logits"], mask) < TOLERANCE["float32"]

    cls, _ = model_and_reference(config.replace(num_labels=3), Head.SEQUENCE_CLASSIFICATION, seed=7)
    cls.save_pretrained(tmp_path / "cls")
    [hf] = oracle_run(tmp_path / "cls", [{"framework": "torch", "input_ids": ids, "attention_mask": mask}],
                      head="sequence_classification")
    assert relative_error(_logits(cls, ids, mask), hf["logits"]) < TOLERANCE["float32"]


def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    """Built on uninitialised storage and filled by plain reads: loading adds about one copy of the
    weights to the process's peak RSS (init-then-load adds two; mmap reads count the file too)."""
    import subprocess
    import sys

    from opt_core import OPTConfig

    config = OPTConfig(vocab_size=50272, hidden_size=256, num_hidden_layers=2, ffn_dim=1024,
                       num_attention_heads=4, max_position_embeddings=256)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").stat().st_size
    script = (
        "import sys, torch\n"
        "import opt_torch.io\n"
        "def status(key):\n"
        "    return next(int(ln.split()[1]) * 1024 for ln in open('/proc/self/status') if ln.startswith(key))\n"
        # The per-process kernel choice (a few timed GEMMs: code pages and workspace, a constant that
        # does not grow with the model) is made first, so the measure is the load itself.
        "from opt_torch.kernels import choose_linear\n"
        f"choose_linear({config.hidden_size}, {config.ffn_dim}, torch.float32)\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "before = status('VmRSS:')\n"
        "opt_torch.OPTForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(status('VmHWM:') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    added = int(out.stdout.strip().splitlines()[-1])
    assert added < 1.3 * weights, f"loading {weights / 2**20:.0f} MiB raised peak RSS by {added / 2**20:.0f} MiB"
