"""Loading Hugging Face folders (every format and key variant) and saving folders HF loads."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from opt_core import CheckpointError, Head
from opt_torch import (
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
)
from tests.golden import hf_golden
from tests.oracle import oracle_run
from tests.torch.helpers import model_and_reference
from tests.variants import CORE_VARIANTS, TOLERANCE, VARIANTS, left_padded_batch, relative_error

pytestmark = pytest.mark.torch


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def _only(folder, tmp_path, *names):
    """A copy of `folder` holding config.json and the named files only."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("config.json", *names):
        shutil.copy(folder / name, out / name)
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_hf_written_checkpoints_match_hf_logits(variant, fmt, tmp_path):
    g = hf_golden(variant)
    model = OPTForCausalLM.from_pretrained(_only(g.folder, tmp_path, fmt))
    assert relative_error(_logits(model, g.ids, g.mask), g.torch["logits"], g.mask) < TOLERANCE["float32"]
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    # HF's safetensors leave the tied lm_head out; its .bin keeps it (same bits, checked): both load tied.
    assert model.loading_info.tied == ["lm_head.weight"]


def _golden_tensors(variant):
    g = hf_golden(variant)
    return g, load_file(str(g.folder / "model.safetensors"))


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_bare_prefix_and_explicit_lm_head(variant, tmp_path):
    g, tensors = _golden_tensors(variant)
    expected = g.torch["logits"]
    bare = {k.removeprefix("model."): v for k, v in tensors.items()}  # `decoder.*`, as the 350m file
    with_head = dict(tensors, **{"lm_head.weight": tensors["model.decoder.embed_tokens.weight"]})
    for name, state in (("bare", bare), ("with_head", with_head)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(g.folder / "config.json", folder)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model = OPTForCausalLM.from_pretrained(folder)
        assert relative_error(_logits(model, g.ids, g.mask), expected, g.mask) < TOLERANCE["float32"], name
    # The bare decoder reads both prefixes too.
    base = OPTModel.from_pretrained(tmp_path / "with_head")
    assert base.loading_info.ignored == ["lm_head.weight"]


@pytest.mark.oracle
def test_sharded_safetensors_and_sharded_bin(tmp_path):
    g, tensors = _golden_tensors("post_ln_proj")
    model = OPTForCausalLM.from_pretrained(g.folder)
    model.save_pretrained(tmp_path / "st", max_shard_size=20_000)
    shards = sorted(p.name for p in (tmp_path / "st").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "st" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "st" / "model.safetensors").exists()
    again = OPTForCausalLM.from_pretrained(tmp_path / "st")
    assert relative_error(_logits(again, g.ids, g.mask), g.torch["logits"], g.mask) < TOLERANCE["float32"]

    # Sharded .bin with its index, as older Hugging Face releases wrote them.
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(g.folder / "config.json", folder)
    keys = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, part in halves.items():
        torch.save({k: torch.from_numpy(tensors[k]) for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from_bin = OPTForCausalLM.from_pretrained(folder)
    assert relative_error(_logits(from_bin, g.ids, g.mask), g.torch["logits"], g.mask) < TOLERANCE["float32"]
    from opt_core.formats.torch_bin import TorchBinReader

    with TorchBinReader(folder) as reader:
        assert reader.shapes() == {k: v.shape for k, v in tensors.items()}
        assert all(np.array_equal(reader.read(k), tensors[k]) for k in tensors)


@pytest.mark.oracle
def test_bad_checkpoints_list_every_problem(tmp_path):
    g, tensors = _golden_tensors("pre_ln")
    broken = dict(tensors)
    del broken["model.decoder.layers.1.fc2.bias"]
    broken["model.decoder.layers.0.self_attn.qkj_proj.weight"] = np.zeros((2, 2), np.float32)
    broken["model.decoder.layers.0.fc1.weight"] = broken["model.decoder.layers.0.fc1.weight"][:, :-1].copy()
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(g.folder / "config.json", folder)
    save_file(broken, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        OPTForCausalLM.from_pretrained(folder)
    text = str(err.value)
    assert "missing tensors (1): decoder.layers.1.fc2.bias" in text
    assert "unexpected tensors (1): model.decoder.layers.0.self_attn.qkj_proj.weight" in text
    assert "wrong shape: model.decoder.layers.0.fc1.weight is [64, 31], the config implies [64, 32]" in text


def test_unsafe_pickles_are_refused(tmp_path):
    import datetime

    config = VARIANTS["pre_ln"]
    config.save_pretrained(tmp_path)
    # An arbitrary object needs a global weights_only refuses to import.
    torch.save({"model.decoder.embed_tokens.weight": datetime.date(2020, 1, 1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="asks for datetime.date; only tensors"):
        OPTForCausalLM.from_pretrained(tmp_path)
    torch.save({"model.decoder.embed_tokens.weight": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="entries that are not tensors"):
        OPTForCausalLM.from_pretrained(tmp_path)


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        OPTForCausalLM.from_pretrained(tmp_path / "nowhere")
    VARIANTS["pre_ln"].save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no OPT weights"):
        OPTForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "tf_model.h5").write_bytes(b"")  # every format is read now: an empty one is refused
    with pytest.raises(CheckpointError, match="tf_model.h5"):
        OPTForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("cls", [OPTForSequenceClassification, OPTForQuestionAnswering])
def test_base_checkpoint_into_a_task_head_initialises_it(cls, tmp_path, caplog):
    config = VARIANTS["post_ln_proj"]
    lm, _ = model_and_reference(config, Head.CAUSAL_LM)
    lm.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="opt_torch"):
        model = cls.from_pretrained(tmp_path)
    assert model.loading_info.new_head and "initialised" in caplog.text
    assert model.loading_info.ignored == []  # the tied lm_head is not in the file
    head = model.score if cls is OPTForSequenceClassification else model.qa_outputs
    assert 0 < head.weight.std().item() < 3 * config.init_std
    assert torch.equal(model.model.decoder.embed_tokens.weight, lm.model.decoder.embed_tokens.weight)


def test_dtype_device_and_meta_build(tmp_path):
    config = VARIANTS["pre_ln"]
    lm, ref = model_and_reference(config, Head.CAUSAL_LM)
    lm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["OPTForCausalLM"] and saved["torch_dtype"] == "float32"
    ids, mask = left_padded_batch(config.vocab_size)
    for dtype in ("bfloat16", torch.float16, "auto"):
        model = OPTForCausalLM.from_pretrained(tmp_path, dtype=dtype, device="cpu")
        want = torch.float32 if dtype == "auto" else getattr(torch, str(dtype).removeprefix("torch."))
        assert {p.dtype for p in model.parameters()} == {want}
        assert all(p.device.type == "cpu" for p in model.parameters())
        name = str(want).removeprefix("torch.")
        assert relative_error(_logits(model, ids, mask), ref(ids, mask).logits, mask) < TOLERANCE[name]
    with pytest.raises(ValueError, match="unknown dtype"):
        OPTForCausalLM.from_pretrained(tmp_path, dtype="float8")


def test_save_load_round_trip_is_exact(tmp_path):
    for head in Head:
        config = VARIANTS["no_affine_ln"]
        model, _ = model_and_reference(config, head)
        model.save_pretrained(tmp_path / head.value)
        again = type(model).from_pretrained(tmp_path / head.value)
        for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert n == m and torch.equal(a, b), n


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
