"""The three backends are hand-kept mirrors; this test keeps them in step (the role Hugging Face's
`utils/check_copies.py` plays). It reads the mirrored modules of opt_torch, opt_tf and opt_flax as
source (AST, nothing imported, so it runs without any framework installed) and compares:

- public names: module-level functions and classes, and the public methods of those classes (a
  model call is `__call__` whatever the framework names it: torch `forward`, Keras `call`);
- the parameter list of every function or method that several backends define: names, order,
  kind (positional, keyword-only, *args, **kwargs), whether it has a default, and the default
  itself when it is a literal (a framework's dtype object is not comparable across frameworks).

Everything one backend has and another lacks must be listed below with the reason. A new public
name or parameter in one backend only fails here until it is mirrored or listed. A mirrored module
that one backend splits further (opt_torch/attention.py holds what TF and Flax keep in modeling.py)
still counts: a name is present in a backend when any of its mirrored modules defines it. Modules
only one framework has (opt_torch's layout, kernels, smoothquant, parallel; opt_flax's sharding;
opt_tf's export) are not mirrors and are not read.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("torch", "tf", "flax")
MIRRORED_MODULES = ("modeling", "attention", "cache", "generation", "io", "losses", "training", "quantize")
CALL_METHOD = {"torch": "forward", "tf": "call", "flax": "__call__"}  # all compared as `__call__`


# ---------------------------------------------------------------- what only some backends have, and why
# (backends that have it, why, names). A class listed here brings its methods with it.
OWN_NAMES: list[tuple[frozenset[str], str, frozenset[str]]] = [
    (frozenset({"torch"}), "PyTorch's attention paths (SDPA, flash, eager) and the mask object they share",
     frozenset({"AttentionMask", "build_attention_mask", "check_attn_implementation", "eager_attention",
                "flash_attention", "OPTPreTrainedModel.set_attn_implementation"})),
    (frozenset({"torch"}), "torch CPU weight layout (opt_torch/layout.py): column-major / packed oneDNN "
     "weights, fused q/k/v, meta-device construction for streaming loads",
     frozenset({"OPTAttention.fuse_qkv", "OPTPreTrainedModel.fuse_qkv", "OPTPreTrainedModel.optimize_layout",
                "OPTPreTrainedModel.pack_weights", "OPTPreTrainedModel.unpack_weights",
                "OPTPreTrainedModel.empty"})),
    (frozenset({"torch"}), "nn.Module conventions Hugging Face users call (device, dtype, train(), "
     "weight init and tying, gradient checkpointing: Flax has `remat=`, Keras ties by construction)",
     frozenset({"OPTPreTrainedModel.device", "OPTPreTrainedModel.dtype", "OPTPreTrainedModel.train",
                "OPTPreTrainedModel.init_weights", "OPTPreTrainedModel.tie_weights", "OPTForCausalLM.tie_weights",
                "OPTPreTrainedModel.gradient_checkpointing_enable",
                "OPTPreTrainedModel.gradient_checkpointing_disable", "enable_gradient_checkpointing"})),
    (frozenset({"tf"}), "Keras layers for OPT's Linear ([in, out] kernel) and float32 two-pass LayerNorm; "
     "torch's twins are nn.Linear/nn.LayerNorm subclasses in opt_torch/layout.py (not a mirrored module: "
     "they carry torch's weight layouts), Flax uses nnx.Linear/nnx.LayerNorm as they are",
     frozenset({"Linear", "LayerNorm"})),
    (frozenset({"flax"}), "nnx needs a module for the positions table (torch: nn.Embedding subclass-free "
     "lookup in the decoder; TF: a variable); sharding constraints exist only under a JAX mesh",
     frozenset({"OPTLearnedPositionalEmbedding", "constrain"})),
    (frozenset({"tf", "flax"}), "the logits projection as its own step (XLA-friendly tied matmul); torch "
     "calls lm_head, a Linear tied to the embedding",
     frozenset({"OPTForCausalLM.lm_logits"})),
    (frozenset({"flax"}), "nnx keeps plain attributes in the hashed graph definition, so these live in "
     "weak side tables behind properties (torch and TF set them as attributes)",
     frozenset({"OPTPreTrainedModel.generation_config", "OPTPreTrainedModel.loading_info"})),
    (frozenset({"tf"}), "Keras variables by canonical name (what opt_tf.io loads and saves through)",
     frozenset({"OPTPreTrainedModel.named_weights"})),
    # ---- io: each framework's dtype resolution and weight filling (names owned by the io module's
    # loader; `fill_*` are the same step under three names: being unified)
    (frozenset({"torch"}), "each framework's dtype resolution", frozenset({"resolve_dtype"})),
    (frozenset({"tf"}), "each framework's dtype resolution", frozenset({"keras_dtype"})),
    (frozenset({"flax"}), "each framework's dtype resolution", frozenset({"jax_dtype"})),
    (frozenset({"tf"}), "being unified: fill a built model from a checkpoint", frozenset({"fill_variables"})),
    (frozenset({"flax"}), "being unified: fill a built model from a checkpoint", frozenset({"fill_params"})),
    # ---- training
    (frozenset({"tf"}), "Keras' fit()/compile() integration and its optimizer/schedule classes",
     frozenset({"AdamW", "KerasTrainingMixin", "TableSchedule"})),
    (frozenset({"flax"}), "optax has no Trainer: the optimizer and the jitted step are public for callers",
     frozenset({"make_optimizer", "train_step"})),
    # ---- quantize: torch has PyTorch CPU int8/int4 kernels and quantizes while streaming (its
    # SmoothQuant calibration is opt_torch/smoothquant.py); TF and Flax one XLA QuantizedLinear
    # (README: "quantize= in each backend")
    (frozenset({"torch"}), "PyTorch's int8/int4 CPU kernels, the int8 vocabulary table, quantizing while "
     "streaming a checkpoint in, and the timing that picks a kernel; TF/Flax take the NumPy "
     "quantize_per_channel from opt_core",
     frozenset({"DynamicInt8Linear", "Int4WeightOnlyLinear", "Int8Embedding", "Int8WeightOnlyLinear",
                "available_w8a8_engines", "choose_w8a8_engine", "cpu_name",
                "dequantize_groupwise_int4", "dequantize_per_channel", "has_vnni", "quantize_groupwise_int4",
                "quantize_layer", "quantize_vocabulary", "quantizing_checkpoint", "quantize_per_channel"})),
    (frozenset({"tf", "flax"}), "XLA has one int8 layer for both modes", frozenset({"QuantizedLinear"})),
    # ---- cache: torch decodes eagerly and edits its cache in place; TF and Flax caches are
    # immutable values carried through compiled loops
    (frozenset({"torch"}), "eager caches: Hugging Face's growing DynamicCache (and the Cache base both "
     "share) and in-place StaticCache edits (crop for assisted decoding, reset for reuse)",
     frozenset({"Cache", "DynamicCache", "StaticCache.crop", "StaticCache.reset"})),
    (frozenset({"tf", "flax"}), "an immutable cache: a call returns it advanced by the tokens it wrote "
     "(torch's advances in place inside update)", frozenset({"StaticCache.advanced"})),
    (frozenset({"torch", "tf"}), "the filled length as a Python int for eager callers; Flax code runs "
     "under jit and reads `cache.length`", frozenset({"StaticCache.get_seq_length"})),
    (frozenset({"flax"}), "a static shape read by the batch-1 in-place write path",
     frozenset({"StaticCache.batch_size"})),
    # ---- generation: torch loops in Python; TF and Flax run whole decoding loops compiled, so the
    # loop carries are named structures and the processors work on fixed-shape tables in-graph
    (frozenset({"tf", "flax"}), "the named carry of the compiled beam-search while-loop (torch keeps a "
     "BeamState in a Python loop)", frozenset({"BeamLoop"})),
    (frozenset({"flax"}), "the named carry of Flax's jitted contrastive loop (TF's passes its values as "
     "while_loop variables)", frozenset({"ContrastiveLoop"})),
    (frozenset({"torch"}), "a Python loop: the beam state is built and read outside any graph",
     frozenset({"BeamState.start", "beam_search_result"})),
    (frozenset({"torch"}), "eager processors and sampling on the ids themselves (torch draws the counter-"
     "based bits through next_tokens and vocab_salt)",
     frozenset({"banned_ngram_mask", "next_tokens", "vocab_salt"})),
    (frozenset({"tf", "flax"}), "in-graph processors on fixed-shape 'seen' tables and the counter-based "
     "random bits computed inside the compiled loop; `run` dispatches one generate call to its loop",
     frozenset({"banned_ngram_tokens", "penalise_seen", "random_bits", "run", "seen_tokens", "uniforms"})),
    (frozenset({"tf"}), "TF's compiled generate function and its cache: the settings that fix a graph "
     "(GenerationSettings) and the values fed to it (Knobs), shared with the SavedModel export",
     frozenset({"GenerationSettings", "Knobs", "compiled_generate_fn", "knobs", "sample"})),
    (frozenset({"flax"}), "counts jit compilations, for the tests that hold prompt bucketing to one graph",
     frozenset({"compilation_count"})),
]

# A model call's parameters each backend alone has (tests/common/test_api.py holds the shared ones
# to one order): torch follows Hugging Face's forward (use_cache, output_attentions); Keras' call
# takes `training`; nnx modules take `deterministic` (dropout) and skip the NumPy input checks
# under `validate=False` (jit traces without them).
OWN_CALL_PARAMETERS = {
    "torch": {"use_cache", "output_attentions", "validate"},
    "tf": {"training"},
    "flax": {"deterministic", "validate"},
}
_MODEL_CALLS = ("OPTModel.__call__", "OPTForCausalLM.__call__", "OPTForSequenceClassification.__call__",
                "OPTForQuestionAnswering.__call__")

# name -> {backend: parameters only it has}, why. Parameters not listed must match exactly.
OWN_PARAMETERS: dict[str, tuple[dict[str, set[str]], str]] = {
    **{name: ({b: set(p) for b, p in OWN_CALL_PARAMETERS.items()}, "see OWN_CALL_PARAMETERS")
       for name in _MODEL_CALLS},
    "io.from_pretrained": ({"torch": {"device", "attn_implementation", "torch_dtype", "tp_plan", "device_mesh",
                                      "calibration", "device_map", "max_memory", "offload_folder"},
                            "flax": {"param_dtype", "rngs", "remat"}},
                           "each backend's own load options (the model classes' **backend_options)"),
    "io.save_pretrained": ({"tf": {"tf_h5"}, "flax": {"flax_msgpack", "safetensors"}},
                           "the framework's own checkpoint file, written on request"),
    "training.train_causal_lm": ({"torch": {"fsdp", "resume_from"}}, "FSDP and its resumable checkpoints are torch's"),
    "cache.StaticCache.get_seq_length": ({"torch": {"layer_idx"}}, "Hugging Face's Cache signature (torch's "
                                         "caches are also handed to code written for HF's)"),
    "cache.init_cache": ({"torch": {"device", "num_heads"}},
                         "torch places the buffers on a device, and a tensor-parallel rank holds only its heads"),
    "generation.decode_one_token": ({"torch": {"output_hidden_states"}},
                                    "torch's contrastive search reads the step's hidden state through the same "
                                    "call; TF and Flax call the model for it inside their compiled loop"),
    "training.evaluate_causal_lm": ({"torch": {"bf16"}}, "autocast evaluation; TF/Flax take the model's dtype"),
    "quantize.quantize_model": ({"torch": {"smoothing", "include_embeddings"}},
                                "SmoothQuant and the int8 vocabulary table are torch's (see OWN_NAMES)"),
    "quantize.quantize_loaded": ({"torch": {"folder", "calibration"}},
                                 "SmoothQuant factors stored beside the checkpoint"),
}

# Signatures that differ beyond a backend's own parameters: being unified (cache and generation
# are being rewritten on another branch; the layer calls take each framework's cache form).
DIFFERENT_SIGNATURES = {
    "modeling.OPTAttention.__call__": "each framework's cache form (torch Cache object, TF StaticCache + layer "
                                      "index, Flax StaticCache and layer index) and dropout switch",
    "modeling.OPTDecoderLayer.__call__": "as OPTAttention.__call__",
    "modeling.OPTDecoder.__call__": "TF receives positions and the key mask already built",
    **{f"generation.{name}": "compiled loops: TF and Flax take the settings that fix a graph as static "
                             "arguments and the rest as tensors, torch one GenerationOptions"
       for name in ("greedy_or_sample_loop", "beam_search_loop", "contrastive_search_loop", "beam_search_step",
                    "prefill", "process_logits", "warp_logits", "apply_no_repeat_ngram", "gumbel_noise",
                    "banned_ngram_tokens")},
    "io.save_pretrained": "Flax makes max_shard_size keyword-only, torch and TF do not (their positional "
                          "order is Hugging Face's)",
}


# ---------------------------------------------------------------- reading the sources
@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # "positional", "*", "keyword", "**"
    default: str | None  # None: no default; "<expr>": a default that is not a literal

    def __str__(self) -> str:
        prefix = {"*": "*", "**": "**"}.get(self.kind, "")
        suffix = "" if self.default is None else f"={self.default}"
        return f"{prefix}{self.name}{suffix}" + (" (keyword-only)" if self.kind == "keyword" else "")


def _default(node: ast.expr) -> str:
    try:
        return repr(ast.literal_eval(node))
    except ValueError:
        return "<expr>"


def _parameters(fn: ast.FunctionDef, method: bool) -> tuple[Parameter, ...]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [Parameter(arg.arg, "positional", None if d is None else _default(d)) for arg, d in zip(positional, defaults)]
    if method and out and out[0].name in ("self", "cls"):
        out = out[1:]
    if a.vararg:
        out.append(Parameter(a.vararg.arg, "*", None))
    out += [Parameter(arg.arg, "keyword", None if d is None else _default(d))
            for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append(Parameter(a.kwarg.arg, "**", None))
    return tuple(out)


def public_api(source: str, backend: str) -> dict[str, tuple[Parameter, ...] | None]:
    """name -> parameters (None for a class) of a module's public functions, classes and methods."""
    api: dict[str, tuple[Parameter, ...] | None] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            api[node.name] = _parameters(node, method=False)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            api[node.name] = None
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                name = "__call__" if item.name == CALL_METHOD[backend] else item.name
                if name.startswith("_") and name != "__call__":
                    continue
                is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in item.decorator_list)
                api[f"{node.name}.{name}"] = _parameters(item, method=not is_static)
    return api


def read_backends(root: Path = ROOT) -> dict[str, dict[str, dict[str, tuple[Parameter, ...] | None]]]:
    """module -> backend -> public API, for every mirrored module a backend has."""
    return {
        module: {b: public_api((root / f"opt_{b}" / f"{module}.py").read_text(), b)
                 for b in BACKENDS if (root / f"opt_{b}" / f"{module}.py").is_file()}
        for module in MIRRORED_MODULES
    }


def _allowed_owners(name: str) -> frozenset[str] | None:
    """The backends the allow-list grants `name` (its own entry first, else its class's)."""
    for key in (name, name.split(".")[0]):
        for owners, _why, names in OWN_NAMES:
            if key in names:
                return owners
    return None


# ---------------------------------------------------------------- the checks
def name_problems(apis: dict[str, dict[str, dict]]) -> list[str]:
    """Public names some backends have and others lack, not listed in OWN_NAMES (a name counts as
    present in a backend when any of its mirrored modules defines it: a module split in one backend
    moves names between files without breaking the mirror)."""
    everywhere: dict[str, dict[str, str]] = {}  # name -> backend -> module
    for module, per_backend in apis.items():
        for b, api in per_backend.items():
            for name in api:
                everywhere.setdefault(name, {})[b] = module
    problems = []
    for name, where in sorted(everywhere.items()):
        have = frozenset(where)
        if have == frozenset(BACKENDS):
            continue
        allowed = _allowed_owners(name)
        if allowed != have:
            module = next(iter(where.values()))
            problems.append(f"{name} ({module}.py) is defined in {sorted(have)} only"
                            + ("" if allowed is None else f"; the allow-list says {sorted(allowed)}"))
    return problems


def signature_problems(apis: dict[str, dict[str, dict]]) -> list[str]:
    """Functions and methods that several backends define with different parameters, beyond the
    parameters OWN_PARAMETERS grants each backend and the names DIFFERENT_SIGNATURES lists."""
    problems = []
    for module, per_backend in apis.items():
        names = set().union(*(api.keys() for api in per_backend.values())) if per_backend else set()
        for name in sorted(names):
            sigs = {b: api[name] for b, api in per_backend.items() if api.get(name) is not None}
            if len(sigs) < 2 or f"{module}.{name}" in DIFFERENT_SIGNATURES:
                continue
            own, _why = OWN_PARAMETERS.get(name, OWN_PARAMETERS.get(f"{module}.{name}", ({}, "")))
            kept = {b: tuple(p for p in s if p.name not in own.get(b, set())) for b, s in sigs.items()}
            if len(set(kept.values())) > 1:
                shown = "; ".join(f"{b}: ({', '.join(map(str, s))})" for b, s in kept.items())
                problems.append(f"{module}.{name} differs: {shown}")
    return problems


def stale_entries(apis: dict[str, dict[str, dict]]) -> list[str]:
    """Allow-list names no backend defines any more (the list must not outlive the drift)."""
    defined = {name for per_backend in apis.values() for api in per_backend.values() for name in api}
    listed = {n for _owners, _why, names in OWN_NAMES for n in names}
    return sorted(n for n in listed if n not in defined)


def test_every_public_name_is_mirrored_or_listed():
    problems = name_problems(read_backends())
    assert not problems, "not mirrored (mirror it, or list it in OWN_NAMES with why):\n" + "\n".join(problems)


def test_every_shared_signature_matches():
    problems = signature_problems(read_backends())
    assert not problems, "signatures drift (align them, or list the parameter in OWN_PARAMETERS with why):\n" + \
        "\n".join(problems)


def test_the_allow_list_names_only_what_exists():
    assert not stale_entries(read_backends())


# ---------------------------------------------------------------- the check itself can fail
def _planted(tmp_path: Path, backend: str, module: str, addition: str) -> Path:
    for b in BACKENDS:
        for m in MIRRORED_MODULES:
            src = ROOT / f"opt_{b}" / f"{m}.py"
            if src.is_file():
                dst = tmp_path / f"opt_{b}" / f"{m}.py"
                dst.parent.mkdir(parents=True, exist_ok=True)
                text = src.read_text()
                dst.write_text(text + addition if (b, m) == (backend, module) else text)
    return tmp_path


def test_a_name_added_to_one_backend_fails(tmp_path):
    before = set(name_problems(read_backends()))
    root = _planted(tmp_path, "flax", "losses", "\n\ndef token_accuracy(logits, labels):\n    return 0\n")
    new = set(name_problems(read_backends(root))) - before
    assert new == {"token_accuracy (losses.py) is defined in ['flax'] only"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_added_to_one_backend_fails(tmp_path, backend):
    source = (ROOT / f"opt_{backend}" / "losses.py").read_text()
    planted = source.replace("def causal_lm_loss(", "def causal_lm_loss(planted, ", 1)
    assert planted != source
    root = _planted(tmp_path, backend, "losses", "")
    (root / f"opt_{backend}" / "losses.py").write_text(planted)
    new = set(signature_problems(read_backends(root))) - set(signature_problems(read_backends()))
    assert len(new) == 1 and new.pop().startswith("losses.causal_lm_loss differs: "), new


# ---------------------------------------------------------------- one shape legend
_PACKAGES = ("opt_core", "opt_torch", "opt_tf", "opt_flax")
_SHAPE = re.compile(r"#.*?\[([^\]]+)\]")
# "H heads," in a legend (a letter, then what it means, then the end of that entry)
_LEGEND_PHRASE = re.compile(r"\b([A-Z]) (heads|head_dim|batch|vocab|hidden_size|ffn_dim|num_labels)(?=[,;.)\"]|$)")


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for pkg in _PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def shape_letter_problems(sources: dict[str, str]) -> list[str]:
    """Upper-case letters in `# [...]` shape comments that the legend lacks, and legend phrases
    ("N heads") that give a letter another meaning than `opt_core.shapes` does."""
    from opt_core.shapes import LETTERS

    meaning = {"heads": "H", "head_dim": "D", "batch": "B", "vocab": "V", "hidden_size": "C", "ffn_dim": "F",
               "num_labels": "L"}
    problems = []
    for path, text in sources.items():
        for number, line in enumerate(text.splitlines(), 1):
            for shape in _SHAPE.findall(line):
                for name in re.findall(r"[A-Za-z_]+", shape):
                    letter = name.removesuffix("_max")
                    if len(letter) == 1 and letter.isupper() and letter not in LETTERS:
                        problems.append(f"{path}:{number}: {letter!r} in [{shape}] is not in opt_core.shapes")
            for letter, what in _LEGEND_PHRASE.findall(line):
                if meaning[what] != letter:
                    problems.append(f"{path}:{number}: '{letter} {what}' (opt_core.shapes: {meaning[what]} {what})")
    return problems


def test_one_shape_legend():
    """The letters live in `opt_core.shapes`; every backend's modeling module points there instead
    of restating them, and no shape comment or legend gives a letter another meaning."""
    assert not shape_letter_problems(_sources())
    for b in BACKENDS:
        assert "opt_core.shapes" in ast.get_docstring(ast.parse((ROOT / f"opt_{b}" / "modeling.py").read_text())), b


def test_a_conflicting_legend_fails():
    planted = {"opt_flax/cache.py": "x = zeros(shape)  # [B, N, S, Q]\n\"\"\"Letters: N heads, H head_dim.\"\"\""}
    assert shape_letter_problems(planted) == [
        "opt_flax/cache.py:1: 'Q' in [B, N, S, Q] is not in opt_core.shapes",
        "opt_flax/cache.py:2: 'N heads' (opt_core.shapes: H heads)",
        "opt_flax/cache.py:2: 'H head_dim' (opt_core.shapes: D head_dim)",
    ]
