"""Small checkpoints on disk for the conversion tests (NumPy-written, no oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conversion import open_reader
from opt_core import OPTConfig
from opt_core.checkpoint import account_keys, save_numpy_safetensors
from opt_core.params import Head, hf_name, parameter_table
from opt_core.reference import random_parameters

FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")


def write_hf_checkpoint(folder: Path, config: OPTConfig, seed: int = 0, head: str = "causal_lm",
                        shard_bytes: int | str = "5GB") -> dict[str, np.ndarray]:
    """A Hugging Face safetensors folder (config.json + weights, tied lm_head omitted as HF does).
    Returns the canonical weights written."""
    params = random_parameters(config, head, seed=seed)
    stored = {s.name: params[s.name] for s in parameter_table(config, head) if s.tied_to is None}
    save_numpy_safetensors(folder, {hf_name(k, head): v for k, v in stored.items()}, max_shard_bytes=shard_bytes)
    arch = {"causal_lm": "OPTForCausalLM", "base": "OPTModel",
            "sequence_classification": "OPTForSequenceClassification",
            "question_answering": "OPTForQuestionAnswering"}[head]
    d = config.to_dict()
    d["architectures"] = [arch]
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    return stored


def read_canonical(folder: Path, fmt: str | None = None, config: OPTConfig | None = None,
                   head: str = "causal_lm") -> dict[str, np.ndarray]:
    """Every tensor of a converted folder by canonical name, strictly accounted."""
    config = config or OPTConfig.from_pretrained(folder)
    with open_reader(folder, fmt, config) as reader:
        acc = account_keys(reader.shapes(), config, Head(head))
        acc.raise_for_errors(str(folder))
        return {name: reader.read(key) for name, key in acc.mapping.items()}


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    bad = [k for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
           or got[k].tobytes() != np.ascontiguousarray(want[k]).tobytes()]
    assert not bad, f"tensors differ: {bad}"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to check that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
