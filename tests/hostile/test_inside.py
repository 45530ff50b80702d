"""Inside the folder means inside: weight files, indexes, shards and metaseq parts reached through a
model folder must really be in it. A link leaving the folder is refused, naming link and target;
the Hugging Face cache's own links (`snapshots/<rev>/x` -> `../../blobs/<sha>` of the same repo)
are recognised by that structure and load. A Hub `revision` that could name a path is refused
before huggingface_hub sees it."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from opt_core import OPTConfig
from opt_core.checkpoint import CheckpointError, open_checkpoint
from opt_core.formats import open_reader
from tests.hostile import fixtures


def _open(folder, fmt=None):
    with open_checkpoint(folder, OPTConfig.from_pretrained(folder), "causal_lm", fmt=fmt) as ckpt:
        return {name: ckpt.read(name) for name in ckpt.names}


def _leaves(link, target):
    return rf"{link} is a link to {target}, outside the model folder"


def test_weight_file_linked_from_outside(tmp_path):
    elsewhere = fixtures.tiny_model(tmp_path / "elsewhere")
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(elsewhere / "config.json", folder)
    (folder / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(CheckpointError, match=_leaves(folder / "model.safetensors", elsewhere / "model.safetensors")):
        _open(folder)


def test_link_to_a_system_file_reveals_none_of_its_bytes(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    folder = fixtures.tiny_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    with pytest.raises(CheckpointError) as info:
        _open(folder)
    (as_number,) = struct.unpack("<Q", secret.read_bytes()[:8])
    message = str(info.value)
    assert "outside the model folder" in message
    assert "daemon" not in message and str(as_number) not in message and f"{as_number:,}" not in message


def test_index_and_shard_linked_from_outside(tmp_path):
    from tests.conversion.helpers import write_hf_checkpoint

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_hf_checkpoint(sharded, fixtures.TINY, shard_bytes=20_000)
    index = "model.safetensors.index.json"
    shards = sorted(set(json.loads((sharded / index).read_text())["weight_map"].values()))
    assert len(shards) > 1

    folder = shutil.copytree(sharded, tmp_path / "index-link")
    (folder / index).unlink()
    (folder / index).symlink_to(sharded / index)
    with pytest.raises(CheckpointError, match=_leaves(folder / index, sharded / index)):
        _open(folder)

    folder = shutil.copytree(sharded, tmp_path / "shard-link")
    (folder / shards[1]).unlink()
    (folder / shards[1]).symlink_to(sharded / shards[1])
    with pytest.raises(CheckpointError, match=_leaves(folder / shards[1], sharded / shards[1])):
        _open(folder)


@pytest.mark.torch
def test_metaseq_part_linked_from_outside(tmp_path):
    part = fixtures.metaseq_with_cfg(tmp_path / "elsewhere", {"decoder_attention_heads": 4,
                                                               "decoder_normalize_before": True})
    folder = tmp_path / "ms"
    folder.mkdir()
    (folder / "reshard-model_part-0.pt").symlink_to(part)
    with pytest.raises(CheckpointError, match=_leaves(folder / "reshard-model_part-0.pt", part)):
        open_reader(folder, "metaseq")


def test_links_that_stay_inside_load(tmp_path):
    folder = fixtures.tiny_model(tmp_path / "m")
    want = _open(folder)
    (folder / "store").mkdir()
    (folder / "model.safetensors").rename(folder / "store" / "weights")
    (folder / "model.safetensors").symlink_to("store/weights")
    got = _open(folder)
    assert sorted(got) == sorted(want) and all((got[k] == want[k]).all() for k in want)


def _hub_cache(tmp_path, repo="models--org--tiny", blobs_repo=None):
    """A Hugging Face cache layout: snapshots/<rev>/<file> links to ../../blobs/<name>."""
    src = fixtures.tiny_model(tmp_path / "src")
    root = tmp_path / "hub" / repo
    snapshot = root / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    blobs = tmp_path / "hub" / (blobs_repo or repo) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("config.json", "model.safetensors")):
        shutil.copy(src / name, blobs / f"blob{i}")
        (snapshot / name).symlink_to(os.path.relpath(blobs / f"blob{i}", snapshot))
    return snapshot, blobs


def test_hugging_face_cache_links_load(tmp_path):
    snapshot, _ = _hub_cache(tmp_path)
    assert (snapshot / "model.safetensors").is_symlink()
    assert len(_open(snapshot)) > 0
    (tmp_path / "my-model").symlink_to(snapshot)  # a user's own link to the snapshot folder
    assert len(_open(tmp_path / "my-model")) > 0


def test_cache_link_into_another_repos_blobs_is_refused(tmp_path):
    snapshot, blobs = _hub_cache(tmp_path, blobs_repo="models--other--repo")
    with pytest.raises(CheckpointError, match=_leaves(snapshot / "model.safetensors", blobs / "blob1")):
        _open(snapshot)


# ---------------------------------------------------------------- revision
@pytest.mark.parametrize("revision", ["../../..", "/etc", "main/../../x", "a//b", ".hidden", "main.lock", "", "a\\b"])
def test_revision_that_could_name_a_path_is_refused_before_the_hub(monkeypatch, revision):
    from opt_core import hub

    def never(*args, **kwargs):
        raise AssertionError("huggingface_hub was asked")

    monkeypatch.setattr(hub, "_download", never)
    with pytest.raises(ValueError, match=r"is not a branch, tag or 40-hex commit name"):
        hub.resolve_pretrained("org/name", revision=revision)


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "refs/pr/3", "0123456789abcdef0123456789abcdef01234567"])
def test_valid_revisions_reach_the_hub(monkeypatch, revision):
    from opt_core import hub

    asked = []
    monkeypatch.setattr(hub, "_unreachable_hub", lambda: None)  # as if the Hub answered: no network here
    monkeypatch.setattr(hub, "_download", lambda repo, name, rev, local_only: asked.append(rev))
    with pytest.raises(FileNotFoundError):
        hub.resolve_pretrained("org/name", revision=revision)
    assert asked == [revision]
