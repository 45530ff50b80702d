"""The LoRA side of the Hugging Face oracle: PEFT (pinned in requirements/oracle.txt) on HF's
OPTForCausalLM, run as every oracle request is (`tests.oracle`), cached by request, script, pins,
the installed PEFT version and the bytes of the folders involved."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.oracle import CACHE, ROOT, _call, _folder_digest, _hash


@functools.cache
def installed_peft_version() -> str:
    found = sorted((ROOT / ".venv-oracle").glob("lib/python*/site-packages/peft-*.dist-info"))
    return found[-1].name.removeprefix("peft-").removesuffix(".dist-info") if found else "missing"


def oracle_peft_logits(model: Path, adapter: Path, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """float32 logits of `peft.PeftModel.from_pretrained(OPTForCausalLM(model), adapter)`."""
    key = _hash("peft_logits", installed_peft_version(), _folder_digest(Path(model)), _folder_digest(Path(adapter)),
                ids, mask)
    out = CACHE / "peft" / f"{key}.npz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        _call({"task": "peft_logits", "model": str(model), "adapter": str(adapter), "input_ids": ids,
               "attention_mask": mask, "out": str(tmp)})
        os.replace(tmp, out)
    return np.load(out)["logits"]


def oracle_peft_adapter(model: Path, lora: dict[str, Any], seed: int = 0, b_std: float = 0.1) -> Path:
    """An adapter folder written by PEFT's `save_pretrained` (A from PEFT's init, B seeded noise).
    Returns the cached folder: copy it before modifying it."""
    key = _hash("peft_adapter", installed_peft_version(), _folder_digest(Path(model)), lora, seed, b_std)
    folder = CACHE / "peft" / f"adapter-{key}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    _call({"task": "peft_adapter", "model": str(model), "lora": lora, "seed": seed, "b_std": b_std, "out": str(tmp)})
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
