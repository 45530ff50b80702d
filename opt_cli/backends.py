"""What the `opt` commands share: resolving model folders, importing a backend lazily with a clear
error, and the few calls whose spelling differs between backends (seeding, generation, scoring).

Every function raises `UsageError` / `FileNotFoundError` / `ValueError` for bad user input, which
`opt_cli.main` prints as one paragraph (exit code 2).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from opt_cli.main import UsageError

BACKENDS = ("torch", "tf", "flax")


def check_backend(name: str) -> str:
    """The backend name, or a UsageError listing the valid ones."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def import_backend(backend: str, module: str | None = None) -> Any:
    """`opt_torch` / `opt_tf` / `opt_flax` (or a submodule), with a clear error when its framework
    is not installed."""
    check_backend(backend)
    name = f"opt_{backend}" + (f".{module}" if module else "")
    if backend == "tf":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if backend == "flax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise UsageError(
            f"the {backend} backend is not available ({e.msg}); install it with "
            f"`pip install opt-reference[{backend}]`"
        ) from None


def resolve_model_dir(model: str) -> Path:
    """`bundled` -> the shipped model folder; otherwise a folder that must hold a `config.json`.

    Raises:
        FileNotFoundError: the folder or its config.json is missing.
    """
    if model == "bundled":
        from opt_core import bundled

        return bundled.path()
    folder = Path(model)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist (use --model bundled for the shipped one)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; is it an OPT model folder?")
    return folder


def load_tokenizer(folder: Path) -> Any:
    """The folder's `OPTTokenizer`; FileNotFoundError naming the missing files."""
    from opt_core import OPTTokenizer

    missing = [f for f in ("vocab.json", "merges.txt") if not (Path(folder) / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer files missing in {folder}: {', '.join(missing)} (a model folder needs vocab.json "
            "and merges.txt to read and write text)"
        )
    return OPTTokenizer.from_pretrained(folder)


def set_threads(backend: str, threads: int) -> None:
    """Limit the framework's CPU threads (torch and TF; JAX reads XLA_FLAGS at import)."""
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif backend == "tf":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


# ---------------------------------------------------------------- models
def add_precision_arguments(p: Any) -> None:
    """--dtype, --quantize and --calibration (passed to `from_pretrained`)."""
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--quantize", default=None, choices=("int8", "w8a8"),
                   help="int8: int8 weights; w8a8: int8 weights and activations (inference)")
    p.add_argument("--calibration", default=None,
                   help="with --quantize w8a8: text file to calibrate SmoothQuant factors on (stored beside the model)")


def precision_kwargs(args: Any) -> dict[str, Any]:
    """The `from_pretrained` keywords of `add_precision_arguments`, only those given."""
    if getattr(args, "calibration", None) and getattr(args, "quantize", None) != "w8a8":
        raise UsageError("--calibration needs --quantize w8a8")
    names = ("dtype", "quantize", "calibration")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def load_causal_lm(backend: str, folder: Path, **kwargs: Any) -> Any:
    """`OPTForCausalLM.from_pretrained(folder, **kwargs)` in the backend, in eval mode."""
    mod = import_backend(backend)
    model = mod.OPTForCausalLM.from_pretrained(folder, **kwargs)
    if backend == "torch":
        model.eval()
    return model


def new_causal_lm(backend: str, config: Any, seed: int = 0) -> Any:
    """A freshly initialised `OPTForCausalLM` in the backend, seeded."""
    mod = import_backend(backend)
    if backend == "torch":
        import torch

        torch.manual_seed(seed)
        return mod.OPTForCausalLM(config)
    if backend == "flax":
        from flax import nnx

        return mod.OPTForCausalLM(config, rngs=nnx.Rngs(seed))
    import keras

    keras.utils.set_random_seed(seed)
    return mod.OPTForCausalLM(config)


def generate(
    backend: str,
    model: Any,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    streamer: Callable[[Any], None] | None = None,
) -> np.ndarray:
    """The backend's `generate`, its seeding spelled the backend's way; int64 [B, T + new] NumPy.

    `streamer` (torch only) is called with each step's new tokens; the other backends compile the
    whole loop, so their text arrives at the end.
    """
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p)
    if backend == "torch":
        out = model.generate(input_ids, attention_mask=attention_mask, seed=seed, streamer=streamer, **kw)
        return out.detach().cpu().numpy().astype(np.int64)
    if backend == "tf":
        out = model.generate(input_ids, attention_mask=attention_mask, seed=seed, **kw)
        return np.asarray(out).astype(np.int64)
    import jax

    out = model.generate(input_ids, attention_mask=attention_mask, prng_key=jax.random.key(seed), **kw)
    return np.asarray(out).astype(np.int64)


def token_nll(backend: str, model: Any, input_ids: np.ndarray, score_from: int) -> tuple[float, int]:
    """Summed negative log-likelihood of `input_ids[0, j]` for j >= max(score_from, 1), each given
    the tokens before it, and how many tokens that is (one row)."""
    if backend == "torch":
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[0, :-1].float()  # (T-1, V) predicts 1..T-1
            targets = torch.as_tensor(input_ids[0, 1:], dtype=torch.long)
            nll = F.cross_entropy(logits, targets, reduction="none").numpy()
    elif backend == "tf":
        import tensorflow as tf

        logits = tf.cast(model(input_ids=input_ids).logits[0, :-1], tf.float32)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=input_ids[0, 1:], logits=logits).numpy()
    else:
        import jax
        import jax.numpy as jnp

        logits = jnp.asarray(model(input_ids=input_ids).logits[0, :-1], jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(input_ids[0, 1:, None]), axis=-1)[:, 0])
    keep = nll[max(score_from, 1) - 1 :]
    return float(np.sum(keep, dtype=np.float64)), int(keep.size)
