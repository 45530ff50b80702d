"""The finished conversion's folder: config and side files beside the weights (the swap into place
is `opt_core.transaction`'s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.config import CONFIG_NAME, OPTConfig
from opt_core.formats.base import final_permissions, is_regular_file

# Files copied along with the weights when the source folder has them.
SIDE_FILES = (
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def write_side_files(src: Path, tmp: Path, raw_config: dict[str, Any] | None, config: OPTConfig,
                     dtype: np.dtype | None, out_dtype: str) -> list[str]:
    """config.json (the source's, with one consistent dtype after a cast; or written from the
    config) and the tokenizer / generation files the source has. Returns the names written."""
    folder = src if src.is_dir() else src.parent
    if raw_config is not None:
        data = dict(raw_config)
        if dtype is not None or "dtype" in data:
            data["torch_dtype"] = out_dtype if dtype is not None else data.get("torch_dtype", data.get("dtype"))
            data["dtype"] = data["torch_dtype"]  # transformers 5 reads `dtype`; keep both equal
    else:
        data = config.to_dict()
        data.setdefault("architectures", ["OPTForCausalLM"])
        data["torch_dtype"] = out_dtype
    (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copied = [CONFIG_NAME]
    for name in SIDE_FILES:
        if is_regular_file(folder / name):
            shutil.copyfile(folder / name, tmp / name)
            copied.append(name)
    for name in copied:
        final_permissions(tmp / name)
    return copied
