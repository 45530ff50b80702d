"""The equivalence engine behind `opt verify`: load one checkpoint in every backend, run the same
left-padded batch (`opt_verify.inputs`), and compare every pair of implementations
(`opt_verify.comparison`) into a `VerifyReport` (`opt_verify.report`), against the one tolerance
table (`opt_verify.tolerances`).

What is compared, per pair (a, b), always at real tokens only (attention_mask == 1):
- logits: max absolute error and the relative error max|a - b| / max|a| (a is the pair's baseline:
  the float64 reference when it is in the pair);
- hidden states: the same relative error per entry (embeddings, then every layer's output, the last
  one after the final LayerNorm and `project_out` as Hugging Face returns it), and the first entry
  above the tolerance;
- greedy decoding: the new tokens of `generate(..., do_sample=False)` position by position, the
  first position where a row differs, and whether that difference is a near-tie (the two tokens'
  logits closer than the pair's tolerance allows to resolve, so either choice is correct).

The pair passes when the logits are within the tolerance for the dtype, greedy decoding agrees up
to a near-tie (or an end-of-sequence token reached by both), and, in float32/float64, every hidden
state is within the tolerance too (in float16/bfloat16 the per-layer errors are a diagnostic: the
table's low-precision bounds are calibrated on logits).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opt_cli.backends import BACKENDS as TABLE_BACKENDS
from opt_cli.backends import adapter as backend_adapter
from opt_cli.errors import UsageError
from opt_core import OPTConfig, parameter_count
from opt_core.checkpoint import formats_present
from opt_core.quantization import QUANTIZE_MODES
from opt_verify.comparison import PairResult, _Run, compare, hidden_labels, relative_error, to_numpy
from opt_verify.inputs import DEFAULT_PROMPTS, VerifyError, build_inputs, default_ids, left_pad
from opt_verify.report import BackendResult, VerifyReport
from opt_verify.tolerances import (
    BACKEND_PAIR_FACTOR,
    HIDDEN_STATES_DECIDE,
    QUANTIZED_TOLERANCES,
    TOLERANCES,
    Tolerance,
)

__all__ = [
    "BACKENDS",
    "BACKEND_PAIR_FACTOR",
    "DEFAULT_PROMPTS",
    "HIDDEN_STATES_DECIDE",
    "QUANTIZED_TOLERANCES",
    "REFERENCE",
    "REFERENCE_MAX_PARAMS",
    "TOLERANCES",
    "BackendResult",
    "PairResult",
    "Tolerance",
    "VerifyError",
    "VerifyReport",
    "backend_available",
    "build_inputs",
    "compare",
    "default_ids",
    "hidden_labels",
    "left_pad",
    "relative_error",
    "to_numpy",
    "verify",
]

BACKENDS = TABLE_BACKENDS  # the one backend table: opt_cli.backends
REFERENCE = "reference"
# Parameters above which the float64 reference is left out under reference="auto": it keeps a
# float64 copy of every weight (8 bytes each) and runs plain NumPy, so opt-350m (331M parameters,
# ~2.7 GB) is the largest size it handles comfortably on a laptop.
REFERENCE_MAX_PARAMS = 400_000_000


# ---------------------------------------------------------------- running one implementation
class _ReferenceAdapter:
    """The float64 reference behind the backends' calling convention."""

    def __init__(self, model_dir: Path, adapter: Path | None = None):
        from opt_core.reference import ReferenceOPTForCausalLM

        self.ref = ReferenceOPTForCausalLM.from_pretrained(model_dir)
        if adapter is not None:  # the adapter folded into the float64 weights
            from opt_core.lora import load_adapter_files, merge_into_parameters

            cfg = self.ref.config
            config, weights = load_adapter_files(adapter, cfg.num_hidden_layers)
            self.ref.params = merge_into_parameters(self.ref.params, config, weights)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.ref(ids, mask)
        return out.logits, list(out.hidden_states)  # HF's convention, like every backend

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
        return self.ref.greedy(ids, mask, max_new_tokens=new_tokens)


class _BackendAdapter:
    """`opt_<name>.OPTForCausalLM` called exactly as API.md documents it."""

    def __init__(self, name: str, model_dir: Path, dtype: str, quantize: str | None = None,
                 adapter: Path | None = None):
        extra = {"quantize": quantize} if quantize else {}
        self.model = backend_adapter(name).load(Path(model_dir), dtype=dtype, **extra)
        if adapter is not None:  # applied as the backend's own LoRA layers, not merged
            backend_adapter(name).module("lora").load_adapter(self.model, adapter)
        if hasattr(self.model, "generation_config"):
            # Plain greedy decoding, as the reference runs it: a folder's generation_config.json
            # defaults (sampling, penalties) are not part of the numerical check.
            from opt_core import GenerationConfig

            self.model.generation_config = GenerationConfig.from_model_config(self.model.config)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = getattr(out, "hidden_states", None) or []
        return to_numpy(out.logits), [to_numpy(h) for h in hidden]

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        return to_numpy(out)


def numerics_of(model: Any) -> str:
    """What a loaded model computes with, where a choice changes the numbers: its quantization
    (`model.quantization`: mode, kernel, activations) and the matmul kernels of its layers (torch's
    `Linear.kernel`); "" when neither is recorded."""
    parts = []
    quantization = dict(getattr(model, "quantization", None) or {})
    if quantization:
        parts.append("quantize=" + ", ".join(f"{k} {quantization[k]}" for k in ("mode", "kernel", "activations")
                                             if k in quantization))
    modules = getattr(model, "modules", None)
    if callable(modules):
        kernels = sorted({m.kernel for m in modules() if isinstance(getattr(m, "kernel", None), str)})
        if kernels:
            parts.append("matmul kernel " + ", ".join(kernels))
    return "; ".join(parts)


def backend_available(name: str) -> str | None:
    """None when `opt_<name>` and its framework import; otherwise why not, in one sentence."""
    return backend_adapter(name).available()


def _one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type, first line and (for multi-line messages) last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_one(
    name: str, model_dir: Path, dtype: str, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
    quantize: str | None = None, adapter: Path | None = None,
) -> tuple[BackendResult, _Run | None]:
    result = BackendResult(name, "ok")
    try:
        t0 = time.perf_counter()
        # the adapter keyword only when there is one: callers (and tests) may substitute the classes
        lora = {"adapter": adapter} if adapter is not None else {}
        runner: Any = (
            _ReferenceAdapter(model_dir, **lora) if name == REFERENCE
            else _BackendAdapter(name, model_dir, dtype, quantize, **lora)
        )
        t1 = time.perf_counter()
        logits, hidden = runner.forward(ids, mask)
        t2 = time.perf_counter()
        tokens = runner.generate(ids, mask, new_tokens) if new_tokens > 0 else ids.copy()
        t3 = time.perf_counter()
    except UsageError as e:  # the backend table's "framework not installed" (names the pip extra)
        return BackendResult(name, "missing", f"cannot import it: {e}"), None
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in ("torch", "tensorflow", "keras", "jax", "jaxlib", "flax") or e.name == f"opt_{name}":
            return BackendResult(name, "missing", f"cannot import it: {e}"), None
        return BackendResult(name, "error", f"ModuleNotFoundError: {e}"), None
    except Exception as e:  # reported, never raised: one broken backend must not hide the others
        return BackendResult(name, "error", _one_line(e)), None
    result.load_s, result.forward_s, result.generate_s = t1 - t0, t2 - t1, t3 - t2
    result.numerics = numerics_of(getattr(runner, "model", None))
    problems = []
    if logits.shape[:2] != ids.shape:
        expected = f"[{ids.shape[0]}, {ids.shape[1]}, vocab]"
        problems.append(f"logits have shape {list(logits.shape)}, expected {expected}")
    if tokens.ndim != 2 or tokens.shape[0] != ids.shape[0] or tokens.shape[1] < ids.shape[1]:
        problems.append(f"generate returned shape {list(tokens.shape)} for a prompt batch {list(ids.shape)}")
    elif not np.array_equal(tokens[:, : ids.shape[1]], ids):
        problems.append("generate did not return the prompt unchanged in front of the new tokens")
    if problems:
        return BackendResult(name, "error", "; ".join(problems)), None
    return result, _Run(runner, logits, hidden, tokens)


# ---------------------------------------------------------------- the entry point
def verify(
    model_dir: str | os.PathLike[str],
    backends: Sequence[str] = BACKENDS,
    dtype: str = "float32",
    prompts: Sequence[str] | None = None,
    input_ids: Any = None,
    attention_mask: Any = None,
    new_tokens: int = 16,
    reference: bool | str = "auto",
    reference_max_params: int = REFERENCE_MAX_PARAMS,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    allow_missing: bool = False,
    progress: Callable[[str], None] | None = None,
    quantize: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Check that every requested backend computes the same model from `model_dir`.

    Args:
        model_dir: a Hugging Face-layout OPT folder (config.json + weights).
        backends: any of "torch", "tf", "flax" (order kept in the report).
        dtype: the backends' compute dtype, a key of `TOLERANCES` (the reference is always float64).
        prompts: texts, tokenized with the folder's tokenizer (or `tokenizer_dir`'s).
        input_ids: token ids instead of prompts: a [batch, seq] array (with `attention_mask`, which
            must be left padding) or a list of id lists of different lengths (left-padded here).
            With neither, the folder's tokenizer runs `DEFAULT_PROMPTS`, or deterministic ids are
            used when the folder has no tokenizer.
        new_tokens: greedy tokens generated and compared.
        reference: "auto" includes the float64 reference when the model has at most
            `reference_max_params` parameters; True or False force it in or out.
        allow_missing: a backend that is not installed is reported but does not fail the run.
        progress: called with one line as each implementation starts and finishes (`opt verify`
            prints them).
        quantize: "int8" or "w8a8" loads the backends with `quantize=` and reports their error
            against the float reference (tolerance `QUANTIZED_TOLERANCES`: only a gross error fails;
            hidden states and greedy tokens are reported, not failed).
        adapter: a LoRA adapter folder (PEFT's files): each backend applies it with its own
            `opt_<name>.lora.load_adapter`, the float64 reference with the adapter merged into its weights.
    Returns:
        A `VerifyReport`; `report.passed` is False when any pair fails, any backend errors, fewer
        than two implementations ran, or a requested backend is missing (unless allow_missing).
    Raises:
        VerifyError: the folder, a backend name, the dtype or the inputs are unusable.
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise VerifyError(f"model folder {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise VerifyError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    backends = list(dict.fromkeys(backends))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise VerifyError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if dtype not in TOLERANCES:
        raise VerifyError(f"unknown dtype {dtype!r}; choose from {', '.join(TOLERANCES)}")
    if reference not in ("auto", True, False):
        raise VerifyError(f"reference must be 'auto', True or False, got {reference!r}")
    if new_tokens < 0:
        raise VerifyError(f"new_tokens must be >= 0, got {new_tokens}")
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None:
        from opt_core.lora import load_adapter_files

        cfg = OPTConfig.from_pretrained(model_dir)
        try:  # a bad adapter is the user's input: one clear error, not three backend failures
            load_adapter_files(adapter_dir, cfg.num_hidden_layers)
        except (ValueError, FileNotFoundError) as e:
            raise VerifyError(str(e)) from None

    config = OPTConfig.from_pretrained(model_dir)
    n_params = parameter_count(config)
    ids, mask, source, texts = build_inputs(
        model_dir, config, prompts, input_ids, attention_mask, tokenizer_dir
    )
    if ids.shape[1] + new_tokens > config.max_position_embeddings:
        raise VerifyError(
            f"{ids.shape[1]} prompt tokens + {new_tokens} new tokens exceed max_position_embeddings "
            f"({config.max_position_embeddings}); use shorter prompts or fewer new tokens"
        )
    tol = TOLERANCES[dtype]
    if quantize is not None:
        if quantize not in QUANTIZED_TOLERANCES:
            raise VerifyError(f"unknown quantize {quantize!r}; choose from {', '.join(QUANTIZED_TOLERANCES)}")
        q = QUANTIZED_TOLERANCES[quantize]
        tol = Tolerance(q.relative, f"quantize={quantize}: error against the float reference reported; {q.reason}")
    errors: list[str] = []

    names: list[str] = []
    results: list[BackendResult] = []
    has_weights = bool(formats_present(model_dir))  # the reference reads every format
    use_reference = reference is True or (
        reference == "auto" and n_params <= reference_max_params and has_weights
    )
    if use_reference:
        names.append(REFERENCE)
    else:
        if reference is False:
            why = "reference=False"
        elif n_params > reference_max_params:
            why = f"{n_params / 1e6:.0f}M parameters > the {reference_max_params / 1e6:.0f}M size guard"
        else:
            why = "the folder holds no weights it can read"
        results.append(BackendResult(REFERENCE, "skipped", f"float64 reference left out: {why}"))
    for name in backends:
        offered = QUANTIZE_MODES.get(name, ())
        if quantize is not None and quantize not in offered:
            # Checked where it exists: a mode one backend lacks is no failure of the others.
            results.append(BackendResult(name, "skipped", f"quantize={quantize!r} is not offered by opt_{name} "
                                                          f"(it offers {', '.join(offered) or 'none'})"))
            continue
        why_not = backend_available(name)
        if why_not is None:
            names.append(name)
        else:
            results.append(BackendResult(name, "missing", why_not))
            if not allow_missing:
                errors.append(f"backend {name} is missing: {why_not}")

    if quantize is not None and not [n for n in names if n != REFERENCE]:
        errors.append(f"none of the backends {', '.join(backends)} offers quantize={quantize!r}")
    runs: dict[str, _Run] = {}
    for i, name in enumerate(names, 1):
        if progress is not None:
            progress(f"[{i}/{len(names)}] {name}: loading, forward pass and {new_tokens} greedy tokens ...")
        res, run = _run_one(name, model_dir, dtype, ids, mask, new_tokens, quantize, adapter_dir)
        if progress is not None:
            progress(f"[{i}/{len(names)}] {name}: {res.status}" + (
                f" ({res.message})" if res.status != "ok" else
                f" (load {res.load_s:.1f} s, forward {res.forward_s:.1f} s, generate {res.generate_s:.1f} s)"))
        results.append(res)
        if run is not None:
            runs[name] = run
        elif res.status == "missing" and allow_missing:
            pass
        else:
            errors.append(f"{name}: {res.message}")
    order = [REFERENCE, *BACKENDS]
    results.sort(key=lambda r: order.index(r.name))

    pairs = []
    ran = [n for n in order if n in runs]
    for a, b in itertools.combinations(ran, 2):
        factor = 1.0 if a == REFERENCE else BACKEND_PAIR_FACTOR
        pairs.append(compare(a, b, runs[a], runs[b], ids, mask, tol.relative * factor, config.eos_token_id,
                             hidden_decides=dtype in HIDDEN_STATES_DECIDE and quantize is None,
                             greedy_decides=quantize is None))
    if len(ran) < 2:
        which = ", ".join(ran) or "none"
        errors.append(f"only {len(ran)} implementation(s) ran ({which}): nothing to compare")

    return VerifyReport(
        model_dir=str(model_dir),
        dtype=dtype,
        tolerance=tol.relative,
        tolerance_reason=tol.reason,
        config=config.to_dict(),
        parameters=n_params,
        batch_shape=list(ids.shape),
        input_source=source,
        new_tokens=new_tokens,
        backends=results,
        pairs=pairs,
        passed=not errors and all(p.passed for p in pairs),
        errors=errors,
        prompts=texts,
        input_ids=ids.tolist(),
        attention_mask=mask.tolist(),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        seconds=time.perf_counter() - start,
    )
