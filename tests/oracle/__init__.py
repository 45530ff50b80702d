"""The main suite's side of the Hugging Face oracles: transformers 4.57.6 in `.venv-oracle` (every
check), and 4.55.4 in `.venv-oracle-455`, the last release shipping contrastive search in the
library (`oracle_run(..., oracle="4.55")`).

Each call becomes one subprocess of `<venv>/bin/python tests/oracle/hf_oracle.py`; results are
cached under `.cache/oracle/` by a hash of the request, the oracle script, the oracle's pinned
requirements, the transformers version installed in its venv and (for runs) the bytes of the
model folder, so reruns cost nothing and a different transformers never answers from a stale cache.

    folder = oracle_checkpoint(config, seed=0)                    # HF-written checkpoint, all formats
    res = oracle_run(folder, [{"framework": "torch", "input_ids": ids, "attention_mask": mask}])
    res[0]["logits"]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opt_core import OPTConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("hf_oracle.py")
ORACLE_PYTHON = ROOT / ".venv-oracle" / "bin" / "python"
# Each oracle: its venv (built by `make oracle` / `make oracle-455`) and its pinned requirements.
ORACLES = {"4.57": (".venv-oracle", "oracle.txt"), "4.55": (".venv-oracle-455", "oracle-455.txt")}
CACHE = Path(os.environ.get("OPT_ORACLE_CACHE", ROOT / ".cache" / "oracle"))
ALL_FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")


class OracleError(RuntimeError):
    pass


def _python(oracle: str) -> Path:
    return ROOT / ORACLES[oracle][0] / "bin" / "python"


def oracle_available(oracle: str = "4.57") -> bool:
    return _python(oracle).is_file()


def require_oracle(oracle: str = "4.57") -> None:
    """Fail (not skip) when an oracle venv is missing: `make test` always builds both."""
    if not oracle_available(oracle):
        target = "oracle" if oracle == "4.57" else "oracle-455"
        pytest.fail(f"the oracle venv is missing ({_python(oracle)}); run `make {target}` (make test does)")


@functools.cache
def installed_transformers_version(oracle: str = "4.57") -> str:
    """The transformers version in an oracle venv, from its dist-info folder (no import needed)."""
    found = sorted((ROOT / ORACLES[oracle][0]).glob("lib/python*/site-packages/transformers-*.dist-info"))
    return found[-1].name.removeprefix("transformers-").removesuffix(".dist-info") if found else "missing"


def _hash(*parts: Any, oracle: str = "4.57") -> str:
    h = hashlib.sha256()
    h.update(SCRIPT.read_bytes())
    h.update((ROOT / "requirements" / ORACLES[oracle][1]).read_bytes())
    h.update(installed_transformers_version(oracle).encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=_jsonable).encode())
    return h.hexdigest()[:24]


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"cannot serialise {type(x)}")


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _call(request: dict[str, Any], timeout: int = 900, oracle: str = "4.57") -> None:
    require_oracle(oracle)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f, default=_jsonable)
        path = f.name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run(
            [str(_python(oracle)), str(SCRIPT), path], capture_output=True, text=True, timeout=timeout, env=env
        )
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise OracleError(f"oracle failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def hf_config_dict(config: OPTConfig | dict[str, Any]) -> dict[str, Any]:
    d = config.to_dict() if isinstance(config, OPTConfig) else dict(config)
    if "remove_final_layer_norm" in d:
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
    return d


def oracle_checkpoint(
    config: OPTConfig | dict[str, Any],
    seed: int = 0,
    head: str = "causal_lm",
    formats: tuple[str, ...] | None = None,
    dtype: str = "float32",
    noise: float = 0.02,
) -> Path:
    """A checkpoint folder written by Hugging Face 4.57.6 (cached). Returns the cached folder:
    copy it before modifying it."""
    if formats is None:
        formats = ALL_FORMATS if head in ("causal_lm", "base") else ("safetensors", "bin")
    cfg = hf_config_dict(config)
    key = _hash("checkpoint", cfg, seed, head, list(formats), dtype, noise)
    folder = CACHE / "ckpt" / key
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    _call({"task": "checkpoint", "config": cfg, "seed": seed, "head": head, "formats": list(formats),
           "dtype": dtype, "noise": noise, "out": str(tmp)})
    try:
        os.replace(tmp, folder)
    except OSError:  # another worker won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def oracle_run(folder: str | Path, runs: list[dict[str, Any]], head: str = "causal_lm",
               oracle: str = "4.57") -> list[dict[str, np.ndarray]]:
    """Run Hugging Face (`oracle`: "4.57" or "4.55", a key of ORACLES) on `folder` once per entry of
    `runs` (see hf_oracle.py); cached."""
    folder = Path(folder)
    key = _hash("run", _folder_digest(folder), head, runs, oracle=oracle)
    out = CACHE / "run" / f"{key}.npz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        _call({"task": "run", "model": str(folder), "head": head, "runs": runs, "out": str(tmp)}, oracle=oracle)
        os.replace(tmp, out)
    data = np.load(out)
    results: list[dict[str, np.ndarray]] = [{} for _ in runs]
    for name in data.files:
        i, field = name.split("/", 1)
        results[int(i)][field] = data[name]
    for res in results:  # hidden_states.J -> one list, as Hugging Face returns it
        n = sum(1 for k in res if k.startswith("hidden_states."))
        if n:
            res["hidden_states"] = [res.pop(f"hidden_states.{j}") for j in range(n)]  # type: ignore[assignment]
    return results


def oracle_processors(cases: list[dict[str, Any]]) -> list[np.ndarray]:
    """Hugging Face's own logits processors / warpers applied to each case (see hf_oracle.py); cached.
    Returns the processed float32 scores per case."""
    key = _hash("processors", cases)
    out = CACHE / "proc" / f"{key}.npz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        _call({"task": "processors", "cases": cases, "out": str(tmp)})
        os.replace(tmp, out)
    data = np.load(out)
    return [data[f"{i}/scores"] for i in range(len(cases))]


def oracle_tokenize(vocab_dir: str | Path, texts: list[str]) -> list[list[int]]:
    """Ids from Hugging Face's `GPT2Tokenizer` (OPT's tokenizer class) for each text; cached."""
    vocab_dir = Path(vocab_dir)
    key = _hash("tokenize", _folder_digest(vocab_dir), texts)
    out = CACHE / "tok" / f"{key}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        _call({"task": "tokenize", "vocab_dir": str(vocab_dir), "texts": texts, "out": str(tmp)})
        os.replace(tmp, out)
    return json.loads(out.read_text())
