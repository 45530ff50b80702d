"""Hugging Face Hub ids (`facebook/opt-125m`) as model folders, through `huggingface_hub`.

A local path always wins; anything else that looks like a repo id is fetched into (or found in)
the Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the cache only),
downloading only `config.json`, the side files, and the weights of the first format present in
load-preference order (safetensors, bin, tf-h5, flax-msgpack). The result is the snapshot folder,
which every loader then reads like any local folder.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from opt_core.formats.files import FORMATS, read_index
from opt_core.safe_files import check_revision

SIDE_FILES = ("generation_config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def is_hub_id(name: str | os.PathLike[str]) -> bool:
    """Whether `name` is not a local path but could be a Hub repo id (`org/name` or `name`)."""
    s = str(name)
    return not Path(s).exists() and bool(_REPO_ID.match(s)) and not s.startswith((".", "/", "~"))


def resolve_pretrained(name_or_path: str | os.PathLike[str], revision: str | None = None,
                       weights: bool = True) -> Path:
    """A local model folder for `name_or_path`: the path itself when it exists, else the Hub
    snapshot of that repo id at `revision` (default "main").

    Args:
        name_or_path: a folder (or file), or a Hub repo id.
        revision: branch, tag or commit of a Hub repo (ignored for local paths).
        weights: also fetch the weights (False: config and tokenizer files only).
    Raises:
        FileNotFoundError: no such local path, and not a Hub id, or the repo/revision/files are
            neither cached nor downloadable (offline, no network).
        ValueError: `revision` is not a branch, tag or commit name (`../..`, an absolute path).
    """
    # Checked first, and for local paths too: huggingface_hub joins the revision into cache paths.
    revision = check_revision(revision)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path} does not exist (and is not a Hugging Face Hub id like 'org/name')")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise FileNotFoundError(
            f"{name_or_path} is not a local folder; loading it from the Hugging Face Hub needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    repo = str(name_or_path)
    # Without a network huggingface_hub retries each file for tens of seconds before giving up: ask
    # whether the Hub answers at all (one connection attempt, a few seconds at most) and, if not,
    # read the cache only, as HF_HUB_OFFLINE=1 would.
    unreachable = None if _offline() else _unreachable_hub()
    local_only = _offline() or unreachable is not None
    config = _download(repo, "config.json", revision, local_only)
    if config is None:
        why = (" (HF_HUB_OFFLINE is set)" if _offline() else
               f" (the Hub at {unreachable} cannot be reached; set HF_HUB_OFFLINE=1 to use only the cache)"
               if unreachable else "")
        raise FileNotFoundError(
            f"{repo} is no local folder, and the Hugging Face Hub repo {repo} (revision {revision or 'main'}) has "
            f"no config.json in the cache ({_cache_dir()}) and could not be downloaded{why}"
        )
    folder = config.parent
    for name in SIDE_FILES:
        _download(repo, name, revision, local_only)
    if weights:
        for single, index in FORMATS.values():
            if index is not None:
                got = _download(repo, index, revision, local_only)
                if got is not None:
                    for shard in dict.fromkeys(read_index(got).values()):
                        if _download(repo, shard, revision, local_only) is None:
                            raise FileNotFoundError(f"{repo}: shard {shard} named by {index} is not available")
                    break
            if _download(repo, single, revision, local_only) is not None:
                break
        else:
            raise FileNotFoundError(f"{repo} (revision {revision or 'main'}) has no OPT weights available")
    return folder


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str:
    """The Hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _endpoint() -> str:
    """The Hub's address, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def _unreachable_hub(timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the Hub's host opens within `timeout` seconds; otherwise the
    endpoint and the reason, for the error message."""
    endpoint = _endpoint()
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"{endpoint} (no host in HF_ENDPOINT)"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{endpoint} ({type(e).__name__}: {str(e)[:80]})"
    return None


def _download(repo: str, filename: str, revision: str | None, local_only: bool) -> Path | None:
    """The cached (downloaded if needed and allowed) file, or None when the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=_cache_dir(),
                                    local_files_only=local_only))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{repo} (revision {revision or 'main'}): {type(e).__name__}: {e}") from None
