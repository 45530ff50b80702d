"""The framework-free half of LoRA: the adapter's configuration (PEFT's `LoraConfig` fields that
matter for OPT), its scaling rule, PEFT's file format (`adapter_config.json` +
`adapter_model.safetensors` with PEFT's key names) and the seeded initialisation every backend uses.

A LoRA adapter on a linear layer y = x W^T + b adds `scaling * (x A^T) B^T`, A [r, in], B [out, r],
scaling = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA). `opt_torch.lora`, `opt_tf.lora` and
`opt_flax.lora` apply it; they get A's initial values, the key names and the files from here, so an
adapter made with one seed starts identical in every backend and moves between them (and PEFT).

Initialisation (PEFT's default, `init_lora_weights=True`): B = 0, A ~ kaiming-uniform with
a = sqrt(5), i.e. uniform on [-1/sqrt(in), 1/sqrt(in)]. Here the uniforms come from the same
counter-based construction as `opt_core.sampling` (MurmurHash3's finaliser on 32-bit counters), keyed
by (seed, layer, module, element), so they are a pure function of the seed in every framework:

    stream key  s = fmix32(fmix32(fmix32(fmix32(k0 ^ LORA_SALT) ^ k1) ^ layer) ^ module_index)
    bits[i]     = fmix32(s ^ fmix32(i + 0x9E3779B9))       i = row * in + column of A
    u           = ((bits >> 8) + 0.5) / 2**24               (exact float32 in (0, 1))
    A           = (2u - 1) / sqrt(in)

with module_index the module's position in `TARGETABLE_MODULES`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.sampling import MASK32, VOCAB_SALT, check_seed, fmix32

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# Module name -> its path inside decoder layer N (Hugging Face's OPT module tree, which PEFT keys use).
TARGETABLE_MODULES: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "fc1": "fc1",
    "fc2": "fc2",
}
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")  # PEFT's default for model_type "opt"
PEFT_PREFIX = "base_model.model.model.decoder.layers."
LORA_SALT = 0x13198A2E  # distinct from sampling's SEED_SALT: the two streams never share keys

_KEY = re.compile(
    r"^base_model\.model\.model\.decoder\.layers\.(\d+)\.(self_attn\.q_proj|self_attn\.k_proj|self_attn\.v_proj|"
    r"self_attn\.out_proj|fc1|fc2)\.lora_(A|B)\.weight$"
)
_MODULE_OF_PATH = {path: name for name, path in TARGETABLE_MODULES.items()}

# adapter_config.json fields that change what the adapter computes; any value but the one here is
# refused (this implementation would silently compute something else).
_UNSUPPORTED_FIELDS: dict[str, Any] = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
    "layer_replication": None,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
}
_EMPTY_OK = {"rank_pattern", "alpha_pattern"}  # dicts: only empty is supported


@dataclass(frozen=True)
class LoraConfig:
    """PEFT's `LoraConfig`, the fields that matter for OPT.

    Args:
        r: rank of the update (> 0).
        lora_alpha: the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`).
        lora_dropout: dropout on the adapter's input in training (0 <= p < 1).
        target_modules: names from `TARGETABLE_MODULES`; PEFT's OPT default is q_proj and v_proj.
        use_rslora: rank-stabilised scaling.
        bias: only "none" (base biases stay frozen, no adapter bias), as PEFT's default.
        base_model_name_or_path: written to adapter_config.json for the reader's information.
        extra: other adapter_config.json keys, kept so a load/save round trip preserves them.

    Raises:
        ValueError: naming the field and value for anything outside these ranges.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    use_rslora: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, Iterable):
            raise ValueError(
                f"LoraConfig.target_modules must be a list of module names from {list(TARGETABLE_MODULES)}, "
                f"got {self.target_modules!r} (regular expressions and 'all-linear' are not supported)"
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty")
        for name in self.target_modules:
            if name not in TARGETABLE_MODULES:
                raise ValueError(
                    f"LoraConfig.target_modules: {name!r} is not an OPT linear layer "
                    f"(choose from {', '.join(TARGETABLE_MODULES)})"
                )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"LoraConfig.target_modules repeats a name: {list(self.target_modules)}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be true or false, got {self.use_rslora!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias must be 'none' (adapter biases are not supported), got {self.bias!r}")

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (as PEFT computes it)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content PEFT writes for this adapter (its keys, its defaults)."""
        d: dict[str, Any] = {
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
            "lora_alpha": self.lora_alpha, "lora_bias": False, "lora_dropout": self.lora_dropout,
            "modules_to_save": None, "peft_type": "LORA", "r": self.r, "rank_pattern": {}, "revision": None,
            "target_modules": list(self.target_modules), "task_type": "CAUSAL_LM", "use_dora": False,
            "use_rslora": self.use_rslora,
        }
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "adapter config") -> LoraConfig:
        """Build from an adapter_config.json dict, refusing what would compute something else.

        Raises:
            ValueError: naming `source`, the key and its value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
        for key, supported in _UNSUPPORTED_FIELDS.items():
            if key in d and d[key] != supported and not (supported is False and d[key] is None):
                raise ValueError(f"{source}: {key} = {d[key]!r} is not supported (only {supported!r})")
        for key in _EMPTY_OK:
            if d.get(key):
                raise ValueError(f"{source}: {key} is not supported (per-module ranks/alphas); it must be empty")
        if "r" not in d or "target_modules" not in d:
            missing = [k for k in ("r", "target_modules") if k not in d]
            raise ValueError(f"{source}: missing key {', '.join(missing)}")
        known = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "base_model_name_or_path"}
        targets = d["target_modules"]
        try:
            return cls(
                r=d["r"], lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                target_modules=tuple(sorted(targets, key=list(TARGETABLE_MODULES).index))
                if isinstance(targets, list) and all(t in TARGETABLE_MODULES for t in targets) else targets,
                use_rslora=d.get("use_rslora", False), bias=d.get("bias", "none"),
                base_model_name_or_path=d.get("base_model_name_or_path"),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `adapter_config.json` into `folder` (created); returns its path."""
        path = Path(folder) / ADAPTER_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LoraConfig:
        """Read `adapter_config.json` from `folder` (or the file itself).

        Raises:
            FileNotFoundError: when it is missing.
            ValueError: when it is not JSON or holds an unsupported setting (named).
        """
        path = Path(folder)
        if path.is_dir():
            path = path / ADAPTER_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no adapter config (expected {ADAPTER_CONFIG_NAME} written by PEFT)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({type(e).__name__} at position {getattr(e, 'pos', '?')})") \
                from None
        return cls.from_dict(d, source=str(path))


# ---------------------------------------------------------------- key names
def peft_key(layer: int, module: str, matrix: str) -> str:
    """PEFT's key of `lora_A` / `lora_B` (matrix "A" / "B") of `module` in decoder layer `layer`."""
    return f"{PEFT_PREFIX}{layer}.{TARGETABLE_MODULES[module]}.lora_{matrix}.weight"


def parse_peft_key(key: str) -> tuple[int, str, str]:
    """PEFT key -> (layer, module, "A"|"B").

    Raises:
        ValueError: naming the key when it is not a LoRA weight of an OPT decoder layer.
    """
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"unexpected adapter key {key!r} (expected {PEFT_PREFIX}N.<module>.lora_A|lora_B.weight)")
    return int(m.group(1)), _MODULE_OF_PATH[m.group(2)], m.group(3)


# ---------------------------------------------------------------- initialisation
def lora_a_uniforms(seed: int, layer: int, module: str, r: int, in_features: int) -> np.ndarray:
    """The float32 uniforms u in (0, 1) [r, in_features] of A's initialisation (module docstring)."""
    seed = check_seed(seed)
    k0, k1 = np.uint32(seed & MASK32), np.uint32(seed >> 32)
    s = fmix32(fmix32(np.asarray(k0 ^ np.uint32(LORA_SALT))) ^ k1)
    s = fmix32(fmix32(s ^ np.uint32(layer & MASK32)) ^ np.uint32(list(TARGETABLE_MODULES).index(module)))
    with np.errstate(over="ignore"):
        counters = fmix32(np.arange(r * in_features, dtype=np.uint32) + np.uint32(VOCAB_SALT))
    bits = fmix32(s ^ counters).reshape(r, in_features)
    return (((bits >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float32)


def init_lora_a(seed: int, layer: int, module: str, r: int, in_features: int) -> np.ndarray:
    """A's initial value [r, in_features] float32: uniform on +-1/sqrt(in_features), the bound of
    PEFT's kaiming_uniform_(a=sqrt(5)), from the seeded counter stream."""
    u = lora_a_uniforms(seed, layer, module, r, in_features)
    bound = np.float32(1.0 / math.sqrt(in_features))
    return ((np.float32(2.0) * u - np.float32(1.0)) * bound).astype(np.float32)


def init_adapter(
    config: LoraConfig, num_layers: int, shapes: Mapping[str, tuple[int, int]], seed: int = 0
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Initial adapter weights {(layer, module): (A [r, in], B [out, r] zeros)} for every target module
    of every layer; `shapes[module]` is that module's (out, in)."""
    return {
        (layer, module): (
            init_lora_a(seed, layer, module, config.r, shapes[module][1]),
            np.zeros((shapes[module][0], config.r), np.float32),
        )
        for layer in range(num_layers)
        for module in config.target_modules
    }


def linear_shapes(hidden_size: int, ffn_dim: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every targetable module of an OPT decoder layer."""
    c, f = hidden_size, ffn_dim
    return {"q_proj": (c, c), "k_proj": (c, c), "v_proj": (c, c), "out_proj": (c, c), "fc1": (f, c), "fc2": (c, f)}


# ---------------------------------------------------------------- files
AdapterWeights = dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def save_adapter_files(folder: str | Path, config: LoraConfig, weights: AdapterWeights) -> list[Path]:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's keys, A [r, in] and
    B [out, r] as stored by PEFT) into `folder`; returns the two paths."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for (layer, module), (a, b) in sorted(weights.items()):
        tensors[peft_key(layer, module, "A")] = np.ascontiguousarray(a)
        tensors[peft_key(layer, module, "B")] = np.ascontiguousarray(b)
    path = folder / ADAPTER_WEIGHTS_NAME
    save_file(tensors, str(path))
    return [config.save_pretrained(folder), path]


def load_adapter_files(
    folder: str | Path, num_layers: int | None = None, shapes: Mapping[str, tuple[int, int]] | None = None
) -> tuple[LoraConfig, AdapterWeights]:
    """Read a PEFT adapter folder: (config, {(layer, module): (A [r, in], B [out, r])} as float32).

    Strict: every key is a LoRA weight of a target module, every target module of every layer has
    both A and B, and their shapes agree with r and (when given) the model's `shapes` / `num_layers`.

    Raises:
        FileNotFoundError: when a file is missing.
        ValueError: naming the file and the offending key, shape or setting.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    config = LoraConfig.from_pretrained(folder)
    path = folder / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{folder}: only adapter_model.bin found; save the adapter with safetensors")
        raise FileNotFoundError(f"{path}: missing (a PEFT adapter folder holds {ADAPTER_WEIGHTS_NAME})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        try:
            layer, module, matrix = parse_peft_key(key)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if module not in config.target_modules:
            raise ValueError(f"{path}: {key} is for {module}, which is not in target_modules "
                             f"{list(config.target_modules)}")
        if num_layers is not None and layer >= num_layers:
            raise ValueError(f"{path}: {key} is for layer {layer}, but the model has {num_layers} layers")
        if value.dtype.kind != "f":
            raise ValueError(f"{path}: {key} has dtype {value.dtype}, expected a float type")
        found.setdefault((layer, module), {})[matrix] = value.astype(np.float32)
    layers = range(num_layers) if num_layers is not None else sorted({k[0] for k in found})
    weights: AdapterWeights = {}
    for layer in layers:
        for module in config.target_modules:
            pair = found.get((layer, module), {})
            for matrix in ("A", "B"):
                if matrix not in pair:
                    raise ValueError(f"{path}: missing {peft_key(layer, module, matrix)}")
            a, b = pair["A"], pair["B"]
            out_in = shapes[module] if shapes is not None else (b.shape[0], a.shape[-1])
            for matrix, value, want in (("A", a, (config.r, out_in[1])), ("B", b, (out_in[0], config.r))):
                if tuple(value.shape) != want:
                    raise ValueError(f"{path}: {peft_key(layer, module, matrix)} has shape {list(value.shape)}, "
                                     f"expected {list(want)} (r={config.r})")
            weights[(layer, module)] = (a, b)
    return config, weights


def merge_into_parameters(
    params: Mapping[str, np.ndarray], config: LoraConfig, weights: AdapterWeights
) -> dict[str, np.ndarray]:
    """Canonical parameters (`opt_core.params` names, [out, in] weights, e.g. the float64 reference's)
    with every adapter folded in: W + scaling * B @ A, computed in the parameters' own dtype (float64
    for the reference). Returns a new dict; `params` is not modified.

    Raises:
        ValueError: when an adapted weight is missing from `params` or its shape does not fit.
    """
    merged = dict(params)
    for (layer, module), (a, b) in weights.items():
        name = f"decoder.layers.{layer}.{TARGETABLE_MODULES[module]}.weight"
        if name not in merged:
            raise ValueError(f"the adapter adapts {name}, which the model does not have")
        w = np.asarray(merged[name])
        if w.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{name} has shape {list(w.shape)}; the adapter expects {[b.shape[0], a.shape[1]]}")
        delta = (b.astype(w.dtype) @ a.astype(w.dtype)) * w.dtype.type(config.scaling)  # [out, r] @ [r, in]
        merged[name] = w + delta
    return merged
