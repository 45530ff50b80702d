"""The one backend table of the project: backend name -> adapter. The `opt` commands, opt_verify,
the benchmarks' runners and the test suite's adapters (tests/backends.py) all read it, so a new
backend is one class and one row of `ADAPTERS` here.

    from opt_cli.backends import adapter
    a = adapter("flax")                      # UsageError listing the names for an unknown one
    model = a.load(folder)                   # OPTForCausalLM.from_pretrained, inference mode
    ids = a.generate(model, input_ids, mask, max_new_tokens=8, streamer=s)   # int64 NumPy [B, T + new]

Commands never branch on a backend's name: what differs between frameworks is a method of its
adapter, and a new backend is one class and one row of `ADAPTERS`. Framework modules are imported
lazily (so `opt --help` is instant), through `opt_cli.quiet` (so their start-up chatter stays off
the terminal), and a missing framework is a one-line UsageError naming the pip extra.

New load-time options (dtype, quantization, a tensor-parallel plan) travel as keyword arguments of
`load(folder, **options)` straight to `from_pretrained`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from opt_cli.errors import UsageError
from opt_cli.quiet import import_quietly
from opt_core.arrays import to_numpy
from opt_core.params import Head

MODEL_CLASS_NAMES = {
    Head.BASE: "OPTModel",
    Head.CAUSAL_LM: "OPTForCausalLM",
    Head.SEQUENCE_CLASSIFICATION: "OPTForSequenceClassification",
    Head.QUESTION_ANSWERING: "OPTForQuestionAnswering",
}


class Adapter:
    """What the `opt` commands need from one backend. Subclasses fill in the framework-specific parts."""

    name: str = ""
    package: str = ""  # opt_torch / opt_tf / opt_flax
    framework: str = ""  # the top-level framework module (imported quietly first)
    extra: str = ""  # pip extra that installs it
    compiles: bool = True  # the first generate call traces / compiles (XLA, tf.function)
    distributed: bool = False  # runs under torchrun: --fsdp training, --tp-plan loading
    calibrates: bool = False  # w8a8 takes SmoothQuant factors calibrated on a text (--calibration)
    checkpoints_gradients: bool = True  # training can recompute layers in backward (--gradient-checkpointing)

    # ------------------------------------------------------------ modules
    def prepare(self) -> None:
        """Environment the framework reads at import (before `module`)."""

    def module(self, sub: str | None = None) -> ModuleType:
        """`opt_torch` (or `opt_torch.<sub>`), or a UsageError when its framework is not installed."""
        self.prepare()
        try:
            import_quietly(self.framework)
            name = self.package + (f".{sub}" if sub else "")
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise UsageError(
                f"the {self.name} backend is not available ({e.msg}); install it with "
                f"`pip install opt-reference[{self.extra}]`"
            ) from None

    def available(self) -> str | None:
        """None when the package and its framework can be imported (nothing is imported to find
        out); otherwise why not, in one sentence naming the pip extra."""
        if importlib.util.find_spec(self.package) is None:
            return f"package {self.package} is not installed"
        if importlib.util.find_spec(self.framework) is None:
            return f"{self.framework} is not installed (pip install 'opt-reference[{self.extra}]')"
        return None

    # ------------------------------------------------------------ models
    def model_class(self, head: Head = Head.CAUSAL_LM) -> type:
        """This backend's class for `head` (`OPTForCausalLM` by default)."""
        return getattr(self.module(), MODEL_CLASS_NAMES[Head(head)])

    def load(self, folder: Path, head: Head = Head.CAUSAL_LM, **options: Any) -> Any:
        """`<head class>.from_pretrained(folder, **options)`, ready for inference."""
        if options.get("tp_plan") and not self.distributed:
            raise UsageError(f"--tp-plan needs a backend that runs under torchrun ({', '.join(distributed())}), "
                             f"not {self.name}")
        if options.get("calibration") is not None and not self.calibrates:
            have = [a.name for a in ADAPTERS.values() if a.calibrates]
            raise UsageError(f"--calibration (SmoothQuant factors) is {', '.join(have)} only: the {self.name} "
                             "backend's w8a8 quantizes activations per token without smoothing; drop --calibration "
                             "or use --backend " + have[0])
        return self.model_class(head).from_pretrained(folder, **options)

    def new(self, config: Any, seed: int, head: Head = Head.CAUSAL_LM, **options: Any) -> Any:
        """A freshly initialised model of `head` (`OPTForCausalLM` by default), its initialisation
        seeded, in inference mode; `options` go to the model class (`bf16_training`'s)."""
        raise NotImplementedError

    def bf16_training(self) -> dict[str, Any]:
        """Prepare bfloat16 training (`opt train --bf16`) before the model is built or loaded, and
        return the options `new` / `load` then take. torch: none (autocast wraps each step)."""
        return {}

    def trainer(self) -> Any:
        """The backend's `training` module (`train_causal_lm`)."""
        return self.module("training")

    # ------------------------------------------------------------ running
    def set_threads(self, threads: int) -> None:
        """Limit the CPU threads the framework computes with."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A framework array as NumPy (`opt_core.arrays.to_numpy`: bfloat16 becomes float32)."""
        return to_numpy(x)

    def generate(self, model: Any, input_ids: np.ndarray, attention_mask: np.ndarray, **kwargs: Any) -> np.ndarray:
        """`model.generate(input_ids, attention_mask=..., **kwargs)` (the contract's keywords: max_new_tokens,
        do_sample, temperature, top_k, top_p, seed, streamer, ...) as int64 NumPy [B, T + new]."""
        out = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        return self.to_numpy(out).astype(np.int64)

    def logits(self, model: Any, input_ids: np.ndarray) -> np.ndarray:
        """float32 NumPy logits [B, T, V]."""
        return self.to_numpy(model(input_ids=input_ids).logits).astype(np.float32)

    def token_nll(self, model: Any, input_ids: np.ndarray, score_from: int) -> tuple[float, int]:
        """Summed negative log-likelihood of `input_ids[0, j]` for j >= max(score_from, 1), each given
        the tokens before it, and how many tokens that is (one row). Log-softmax in float64 NumPy."""
        logits = self.logits(model, input_ids)[0, :-1]  # (T-1, V): row t predicts token t + 1
        targets = np.asarray(input_ids[0, 1:])
        nll = np.empty(len(logits), dtype=np.float64)
        for i in range(0, len(logits), 256):  # float64 in row chunks: a 2048 x 50k window stays small
            rows = logits[i : i + 256].astype(np.float64)
            top = rows.max(axis=-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1))
            nll[i : i + 256] = logz - rows[np.arange(len(rows)), targets[i : i + 256]]
        keep = nll[max(score_from, 1) - 1 :]
        return float(np.sum(keep, dtype=np.float64)), int(keep.size)


class TorchAdapter(Adapter):
    name, package, framework, extra = "torch", "opt_torch", "torch", "torch"
    compiles = False  # eager
    distributed = True
    calibrates = True

    def load(self, folder: Path, head: Head = Head.CAUSAL_LM, **options: Any) -> Any:
        return super().load(folder, head, **options).eval()

    def new(self, config: Any, seed: int, head: Head = Head.CAUSAL_LM, **options: Any) -> Any:
        cls = self.model_class(head)
        import torch

        torch.manual_seed(seed)
        return cls(config, **options).eval()

    def set_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def logits(self, model: Any, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return super().logits(model, input_ids)


class TFAdapter(Adapter):
    name, package, framework, extra = "tf", "opt_tf", "tensorflow", "tf"
    checkpoints_gradients = False  # Keras fit has no per-layer recomputation here

    def new(self, config: Any, seed: int, head: Head = Head.CAUSAL_LM, **options: Any) -> Any:
        cls = self.model_class(head)
        import keras

        keras.utils.set_random_seed(seed)
        return cls(config, **options)

    def bf16_training(self) -> dict[str, Any]:
        # Keras fixes a layer's compute dtype when the layer is built: the policy must be set first.
        import_quietly("keras").mixed_precision.set_global_policy("mixed_bfloat16")
        return {}

    def set_threads(self, threads: int) -> None:
        import_quietly("tensorflow").config.threading.set_intra_op_parallelism_threads(threads)


class FlaxAdapter(Adapter):
    name, package, framework, extra = "flax", "opt_flax", "jax", "flax"

    def prepare(self) -> None:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    def new(self, config: Any, seed: int, head: Head = Head.CAUSAL_LM, **options: Any) -> Any:
        cls = self.model_class(head)
        from flax import nnx

        return cls(config, rngs=nnx.Rngs(seed), **options)

    def bf16_training(self) -> dict[str, Any]:
        # Flax fixes the compute dtype at construction: bf16 compute over float32 parameters.
        import jax.numpy as jnp

        return {"dtype": jnp.bfloat16, "param_dtype": jnp.float32}

    def set_threads(self, threads: int) -> None:
        # JAX has no thread-count setting: pin the process to `threads` of the CPUs it may use.
        if threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        if hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, cpus[: max(threads, 1)])


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (TorchAdapter(), TFAdapter(), FlaxAdapter())}
BACKENDS = tuple(ADAPTERS)


def adapter(name: str) -> Adapter:
    """The adapter for a backend name, or a UsageError listing the valid ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None


def distributed() -> list[str]:
    """Names of the backends that run under torchrun (FSDP training, tensor-parallel loading)."""
    return [a.name for a in ADAPTERS.values() if a.distributed]


def adapters(names: str) -> list[Adapter]:
    """Adapters for a comma-separated list (`--backends torch,tf`), in order, without repeats."""
    wanted = list(dict.fromkeys(b.strip() for b in names.split(",") if b.strip()))
    unknown = [b for b in wanted if b not in ADAPTERS]
    if unknown or not wanted:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from: {', '.join(BACKENDS)}")
    return [ADAPTERS[b] for b in wanted]
