"""One small adapter per backend, so a model, io or training test is written once and runs on
torch, TF and Flax (keras-hub style). Tests take the `backend` fixture (tests/conftest.py), which is
parametrized over `BACKENDS` and carries that backend's pytest marker:

    def test_something(backend):
        model = backend.build(VARIANTS["pre_ln"], Head.CAUSAL_LM, params)
        out = backend.forward(model, ids, attention_mask=mask)   # dict of NumPy arrays
        backend.save(model, folder); again = backend.load(Head.CAUSAL_LM, folder)
        loss = backend.train_step(model, {"input_ids": ids, "attention_mask": mask})

Every adapter does the same thing with the same arguments; what differs is spelled out here, once.
Per-backend test files keep only what one backend alone has (SDPA/flash, SavedModel, mesh sharding).
The backend table itself (names, packages, model classes, seeded construction, to-NumPy) is the
library's, `opt_cli.backends`: these adapters add only what tests need on top (parameters by
canonical name, a plain SGD step).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from opt_cli.backends import ADAPTERS, MODEL_CLASS_NAMES, Adapter
from opt_cli.backends import BACKENDS as BACKENDS
from opt_core import OPTConfig
from opt_core.layout import from_layout, to_layout
from opt_core.params import Head, hf_name, parameter_table

__all__ = ["BACKENDS", "MODEL_CLASS_NAMES", "Backend", "get_backend"]
# The keyword arguments every backend's model call accepts, with the same meaning.
FORWARD_KEYWORDS = ("attention_mask", "position_ids", "labels", "start_positions", "end_positions",
                    "output_hidden_states")
# The label columns of each head's loss.
LABEL_COLUMNS = {
    Head.CAUSAL_LM: ("labels",),
    Head.SEQUENCE_CLASSIFICATION: ("labels",),
    Head.QUESTION_ANSWERING: ("start_positions", "end_positions"),
}


class Backend:
    """What the shared tests need from a backend. `name` is "torch", "tf" or "flax"; the package,
    `modeling`, `losses`, `training`, `io` and `generation` modules are attributes."""

    name: str

    @property
    def adapter(self) -> Adapter:
        """The library's adapter of this backend (`opt_cli.backends.ADAPTERS`)."""
        return ADAPTERS[self.name]

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def module(self, sub: str | None = None) -> ModuleType:
        return self.adapter.module(sub)

    @property
    def package(self) -> ModuleType:
        return self.module()

    @property
    def modeling(self) -> ModuleType:
        return self.module("modeling")

    @property
    def losses(self) -> ModuleType:
        return self.module("losses")

    @property
    def training(self) -> ModuleType:
        return self.module("training")

    @property
    def generation(self) -> ModuleType:
        return self.module("generation")

    @property
    def io(self) -> ModuleType:
        return self.module("io")

    def model_class(self, head: Head = Head.CAUSAL_LM) -> type:
        return self.adapter.model_class(head)

    # ------------------------------------------------------------ build, weights
    def build(self, config: OPTConfig, head: Head = Head.CAUSAL_LM, params: dict[str, np.ndarray] | None = None,
              seed: int = 0) -> Any:
        """A `head` model of `config` in inference mode, holding `params` (canonical names and
        layout, e.g. `opt_core.reference.random_parameters`) or else its own seeded init."""
        model = self.adapter.new(config, seed, head)
        if params is not None:
            self.set_params(model, params)
        return model

    def params(self, model: Any) -> dict[str, np.ndarray]:
        """Canonical name -> float NumPy array (canonical layout) of every stored parameter (a tied
        lm_head is left out)."""
        raise NotImplementedError

    def set_params(self, model: Any, params: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def lm_head_is_embedding(self, model: Any) -> bool:
        """A tied causal LM's head is the token embedding itself, not a copy (TF and Flax build no
        lm_head parameter when tied; torch shares the tensor)."""
        return getattr(model, "lm_head", None) is None

    # ------------------------------------------------------------ calls
    def forward(self, model: Any, input_ids: np.ndarray, **kwargs: Any) -> dict[str, Any]:
        """model(input_ids, **kwargs) in inference mode -> {field: NumPy array} for every array
        output (`hidden_states` as a list of arrays). Keywords: `FORWARD_KEYWORDS`."""
        unknown = set(kwargs) - set(FORWARD_KEYWORDS)
        if unknown:
            raise TypeError(f"forward takes {FORWARD_KEYWORDS}, not {sorted(unknown)}")
        out = self._call(model, input_ids, kwargs)
        result: dict[str, Any] = {}
        for key in ("loss", "logits", "last_hidden_state", "start_logits", "end_logits"):
            value = getattr(out, key, None)
            if value is not None:
                result[key] = self.to_numpy(value)
        if getattr(out, "hidden_states", None) is not None:
            result["hidden_states"] = [self.to_numpy(h) for h in out.hidden_states]
        return result

    def _call(self, model: Any, input_ids: np.ndarray, kwargs: dict[str, Any]) -> Any:
        return model(input_ids, **kwargs)

    def tensor(self, x: np.ndarray) -> Any:
        """A NumPy array as this framework's array type."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.adapter.to_numpy(x)

    def train_step(self, model: Any, batch: dict[str, np.ndarray], learning_rate: float = 1e-2) -> float:
        """One plain SGD step (w -= lr * grad) on the head's own loss (`labels` default to the
        real tokens for a causal LM); returns the loss before the step. Dropout stays as the
        model's mode has it (inference mode after `build`)."""
        raise NotImplementedError

    # ------------------------------------------------------------ files
    def save(self, model: Any, folder: str | Path, **kwargs: Any) -> list[Path]:
        return model.save_pretrained(folder, **kwargs)

    def load(self, head: Head, folder: str | Path, **kwargs: Any) -> Any:
        return self.model_class(head).from_pretrained(folder, **kwargs)


def _causal_labels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "labels" in batch:
        return batch
    mask = batch.get("attention_mask")
    labels = batch["input_ids"] if mask is None else np.where(mask == 0, -100, batch["input_ids"])
    return {**batch, "labels": labels}


def _head_batch(model: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _causal_labels(batch) if Head(model.head) is Head.CAUSAL_LM else batch


class TorchBackend(Backend):
    name = "torch"

    def params(self, model):
        head = Head(model.head)
        state = model.state_dict()
        return {s.name: state[hf_name(s.name, head)].detach().float().numpy().copy()
                for s in parameter_table(model.config, head) if s.tied_to is None}

    def set_params(self, model, params):
        import torch

        head = Head(model.head)
        state = {hf_name(k, head): torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False)

    def lm_head_is_embedding(self, model):
        return model.lm_head.weight is model.model.decoder.embed_tokens.weight

    def _call(self, model, input_ids, kwargs):
        import torch

        with torch.no_grad():
            return model(input_ids, **kwargs)

    def tensor(self, x):
        import torch

        return torch.from_numpy(np.asarray(x))

    def train_step(self, model, batch, learning_rate=1e-2):
        import torch

        loss = model(**_head_batch(model, batch)).loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= learning_rate * p.grad
        model.zero_grad(set_to_none=True)
        return float(loss.detach())


class TFBackend(Backend):
    name = "tf"

    def params(self, model):
        specs = {s.name: s for s in parameter_table(model.config, model.head)}
        return {name: from_layout(np.asarray(var.numpy()), specs[name].layout("tf"))
                for name, var in model.named_weights().items()}

    def set_params(self, model, params):
        specs = {s.name: s for s in parameter_table(model.config, model.head)}
        for name, var in model.named_weights().items():
            var.assign(to_layout(params[name], specs[name].layout("tf")))

    def tensor(self, x):
        import tensorflow as tf

        return tf.convert_to_tensor(x)

    def train_step(self, model, batch, learning_rate=1e-2):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = model(**_head_batch(model, batch), training=False).loss
        variables = model.trainable_variables
        for var, grad in zip(variables, tape.gradient(loss, variables)):
            if grad is not None:
                var.assign_sub(learning_rate * tf.convert_to_tensor(grad))
        return float(loss)


class FlaxBackend(Backend):
    name = "flax"

    def params(self, model):
        return {k: np.asarray(v, np.float32) if v.dtype.name == "bfloat16" else np.asarray(v)
                for k, v in self.io.canonical_tensors(model).items()}

    def set_params(self, model, params):
        import jax.numpy as jnp
        from flax import nnx

        from opt_core.formats.flax_msgpack import flax_path

        head = Head(model.head)
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for spec in parameter_table(model.config, head):
            if spec.tied_to is not None and model.config.tie_word_embeddings:
                continue
            path = tuple(int(p) if p.isdigit() else p for p in flax_path(spec, head))
            var = flat[path]
            var.set_value(jnp.asarray(to_layout(params[spec.name], spec.layout("flax")), var.get_value().dtype))
        nnx.update(model, nnx.from_flat_state(flat))

    def tensor(self, x):
        import jax.numpy as jnp

        return jnp.asarray(x)

    def train_step(self, model, batch, learning_rate=1e-2):
        import jax
        from flax import nnx

        inputs = _head_batch(model, batch)
        loss, grads = nnx.value_and_grad(lambda m: m(**inputs).loss)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads))
        return float(loss)


@functools.cache
def get_backend(name: str) -> Backend:
    """The adapter of backend `name` ("torch", "tf" or "flax")."""
    return {"torch": TorchBackend, "tf": TFBackend, "flax": FlaxBackend}[name]()
