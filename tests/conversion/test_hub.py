"""Hugging Face Hub ids resolve offline from a prepared HF cache in every backend, the reference,
the tokenizer and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from opt_cli.main import main
from opt_core.hub import is_hub_id, resolve_pretrained
from tests.conversion.helpers import write_hf_checkpoint
from tests.variants import VARIANTS

pytestmark = [pytest.mark.torch, pytest.mark.tf, pytest.mark.flax]
REPO = "facebook/opt-tiny"
DATA = Path(__file__).resolve().parents[2] / "data"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding `facebook/opt-tiny` at one revision (refs/main points at it),
    used offline."""
    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--facebook--opt-tiny" / "snapshots" / REVISION
    stored = write_hf_checkpoint(snapshot, VARIANTS["pre_ln"])
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / "opt-tokenizer" / name, snapshot / name)
    (cache / "models--facebook--opt-tiny" / "refs").mkdir()
    (cache / "models--facebook--opt-tiny" / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot, stored


def test_hub_ids_load_offline_in_every_backend(hub_cache, capsys):
    import opt_flax
    import opt_tf
    import opt_torch
    from opt_core import OPTTokenizer
    from opt_core.reference import ReferenceOPTForCausalLM

    snapshot, stored = hub_cache
    assert is_hub_id(REPO) and not is_hub_id(str(snapshot))
    assert resolve_pretrained(REPO) == snapshot == resolve_pretrained(REPO, revision=REVISION)
    want = stored["decoder.layers.1.fc1.weight"]
    torch_model = opt_torch.OPTForCausalLM.from_pretrained(REPO)
    np.testing.assert_array_equal(torch_model.model.decoder.layers[1].fc1.weight.detach().numpy(), want)
    assert opt_tf.OPTForCausalLM.from_pretrained(REPO, revision=REVISION).loading_info.ok
    assert opt_flax.OPTForCausalLM.from_pretrained(REPO).loading_info.ok
    np.testing.assert_array_equal(ReferenceOPTForCausalLM.from_pretrained(REPO).params["decoder.layers.1.fc1.weight"],
                                  want)
    assert OPTTokenizer.from_pretrained(REPO).encode("Hello")
    assert main(["info", REPO]) == 0
    capsys.readouterr()
    out = snapshot.parent.parent.parent.parent / "converted"
    assert main(["convert", REPO, str(out), "--to", "flax-msgpack", "--no-progress", "--verify"]) == 0
    assert "bit-exact" in capsys.readouterr().out


def test_unknown_hub_ids_say_what_was_tried(hub_cache):
    import opt_torch

    with pytest.raises(FileNotFoundError, match="no local folder.*facebook/opt-none.*HF_HUB_OFFLINE"):
        opt_torch.OPTForCausalLM.from_pretrained("facebook/opt-none")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained("./not/here")


def test_a_cached_repo_loads_without_a_network_and_without_hf_hub_offline(hub_cache, monkeypatch):
    """Nothing answers at HF_ENDPOINT: the cache is read at once instead of retrying every file."""
    import time

    snapshot, _ = hub_cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    t0 = time.perf_counter()
    assert resolve_pretrained(REPO) == snapshot
    assert time.perf_counter() - t0 < 10


def test_an_uncached_repo_without_a_network_fails_fast_in_one_line(tmp_path):
    import time

    from tests.cli.entry import one_line_error, opt

    t0 = time.perf_counter()
    proc = opt("info", "facebook/opt-none", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_OFFLINE="0")
    seconds = time.perf_counter() - t0
    line = one_line_error(proc, 2, "info")  # a MODEL argument that names nothing: exit 2, as a missing folder
    assert "facebook/opt-none" in line and "cannot be reached" in line and "HF_HUB_OFFLINE=1" in line
    assert seconds < 20, seconds  # a fresh `opt` process; huggingface_hub's own retries took 23 s and more
