"""The equivalence engine behind `opt verify`: load one checkpoint in every backend, run the same
left-padded batch, and compare every pair of implementations.

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

import importlib
import importlib.util
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt_core import OPTConfig, OPTTokenizer, parameter_count
from opt_core.checkpoint import formats_present
from opt_core.tokenizer import MERGES_FILE, VOCAB_FILE

BACKENDS = ("torch", "tf", "flax")
REFERENCE = "reference"
# Parameters above which the float64 reference is left out under reference="auto": it keeps a
# float64 copy of every weight (8 bytes each) and runs plain NumPy, so opt-350m (331M parameters,
# ~2.7 GB) is the largest size it handles comfortably on a laptop.
REFERENCE_MAX_PARAMS = 400_000_000

DEFAULT_PROMPTS = (
    "Hello, my dog is cute",
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that changed",
)


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted relative error max|a - b| / max|a| at real tokens, and why."""

    relative: float
    reason: str


# Against the float64 reference. Kept equal to tests/variants.TOLERANCE (the suite's table).
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-9, "both sides float64: only the summation order differs"),
    "float32": Tolerance(
        1e-5,
        "float32 rounding through the layers is ~1e-7 relative; 1e-5 leaves room for different "
        "summation orders (oneDNN, XLA)",
    ),
    "float16": Tolerance(
        1e-2, "float16 activations keep ~11 bits; errors compound over layers and the softmax"
    ),
    "bfloat16": Tolerance(4e-2, "bfloat16 keeps 8 bits of mantissa"),
}
# quantize= models (opt_*.quantize) against the float reference: their error is reported, and only
# a gross one (a broken kernel, not rounding) fails. Greedy tokens may differ (reported, not failed).
QUANTIZED_TOLERANCES: dict[str, Tolerance] = {
    "int8": Tolerance(5e-2, "int8 weights (per-channel scales) round each weight to 1/254 of its row's range"),
    "w8a8": Tolerance(1e-1, "int8 weights and activations: rounding of both, per call"),
}
# Two backends each within `relative` of the reference are within twice that of each other.
BACKEND_PAIR_FACTOR = 2.0
# Dtypes where every hidden state must also be within the tolerance. The float16/bfloat16 bounds are
# calibrated on logits (as the suite uses them); the residual stream before the final LayerNorm is
# not normalised, so its low-precision error runs higher and is reported there as a diagnostic only.
HIDDEN_STATES_DECIDE = ("float64", "float32")


class VerifyError(ValueError):
    """Bad input to `verify` (missing folder, unknown backend or dtype, unusable prompts)."""


# ---------------------------------------------------------------- results
@dataclass
class BackendResult:
    """One implementation's part of a run."""

    name: str
    status: str  # "ok", "missing" (not installed), "error" (failed to load or run), "skipped"
    message: str = ""
    load_s: float | None = None
    forward_s: float | None = None
    generate_s: float | None = None


@dataclass
class PairResult:
    """The comparison of implementation `b` against baseline `a`."""

    a: str
    b: str
    tolerance: float
    logits_max_abs: float | None = None
    logits_rel: float | None = None
    hidden_labels: list[str] = field(default_factory=list)
    hidden_rel: list[float | None] = field(default_factory=list)  # None: shapes differ
    first_divergent_layer: str | None = None
    greedy_matched: int = 0  # positions equal before each row's first difference
    greedy_compared: int = 0  # positions compared (up to an end-of-sequence both reached)
    greedy_first_divergence: dict[str, int] | None = None  # {"row", "position"} (0 = first new token)
    greedy_near_tie: bool | None = None  # the first divergence is a tie within the tolerance
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # reported, not failing


@dataclass
class VerifyReport:
    """Everything `verify` found; `passed` is the exit status's truth."""

    model_dir: str
    dtype: str
    tolerance: float
    tolerance_reason: str
    config: dict[str, Any]
    parameters: int
    batch_shape: list[int]
    input_source: str  # "prompts", "input_ids" or "default ids"
    new_tokens: int
    backends: list[BackendResult]
    pairs: list[PairResult]
    passed: bool
    errors: list[str] = field(default_factory=list)
    prompts: list[str] | None = None
    input_ids: list[list[int]] = field(default_factory=list)
    attention_mask: list[list[int]] = field(default_factory=list)
    date: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot serialise {type(x).__name__}")


# ---------------------------------------------------------------- inputs
def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists of different lengths: (input_ids, attention_mask), both [batch, max_len] int64."""
    if not rows or any(len(r) == 0 for r in rows):
        raise VerifyError("every input row needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = np.asarray(row, dtype=np.int64)
        mask[i, width - len(row):] = 1
    return ids, mask


def default_ids(config: OPTConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 9, 5 and 7 tokens, left-padded, each starting with `</s>`: deterministic ids
    for folders without a tokenizer."""
    rng = np.random.default_rng(seed)
    low = min(4, config.vocab_size - 1)
    rows = [[config.bos_token_id, *rng.integers(low, config.vocab_size, n - 1).tolist()] for n in (9, 5, 7)]
    return left_pad(rows, config.pad_token_id)


def build_inputs(
    model_dir: Path,
    config: OPTConfig,
    prompts: Sequence[str] | None,
    input_ids: Any,
    attention_mask: Any,
    tokenizer_dir: str | os.PathLike[str] | None,
) -> tuple[np.ndarray, np.ndarray, str, list[str] | None]:
    """The batch every implementation runs: (ids, mask, source, prompts)."""
    if prompts is not None and input_ids is not None:
        raise VerifyError("give prompts or input_ids, not both")
    if input_ids is not None:
        if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
            ids = input_ids.astype(np.int64)
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        else:
            ids, mask = left_pad([list(map(int, r)) for r in input_ids], config.pad_token_id)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise VerifyError(
                f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]"
            )
        source = "input_ids"
        texts = None
    else:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
        has_tokenizer = (tok_dir / VOCAB_FILE).is_file() and (tok_dir / MERGES_FILE).is_file()
        if prompts is not None and not has_tokenizer:
            raise VerifyError(
                f"prompts need a tokenizer, but {tok_dir} has no {VOCAB_FILE} + {MERGES_FILE}; "
                "pass tokenizer_dir (--tokenizer) or input_ids"
            )
        if has_tokenizer:
            texts = list(prompts if prompts is not None else DEFAULT_PROMPTS)
            if not texts or not all(isinstance(t, str) and t for t in texts):
                raise VerifyError("prompts must be a non-empty list of non-empty strings")
            tok = OPTTokenizer.from_pretrained(tok_dir)
            rows = [tok.encode(t) for t in texts]
            ids, mask = left_pad(rows, config.pad_token_id)
            source = "prompts"
        else:
            ids, mask = default_ids(config)
            texts, source = None, "default ids"
    if ids.max() >= config.vocab_size or ids.min() < 0:
        bad = int(ids.max()) if ids.max() >= config.vocab_size else int(ids.min())
        raise VerifyError(f"token id {bad} is outside the model's vocabulary [0, {config.vocab_size})")
    if not mask[:, -1].all():
        raise VerifyError("the batch must be left-padded: every row's last position must be a real token")
    return ids, mask, source, texts


# ---------------------------------------------------------------- running one implementation
def to_numpy(x: Any) -> np.ndarray:
    """A framework array (torch, TensorFlow, JAX or NumPy) as a float64 or int64 NumPy array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype.itemsize < 4:
            x = x.float()  # NumPy has no bfloat16
        x = x.numpy()
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    return arr.astype(np.float64)


@dataclass
class _Run:
    """What one implementation produced on the batch."""

    model: Any
    logits: np.ndarray  # [B, T, V] float64
    hidden: list[np.ndarray]  # embeddings, each layer ([-1] after final LN / project_out)
    tokens: np.ndarray  # [B, T + new] int64


class _ReferenceAdapter:
    """The float64 reference behind the backends' calling convention."""

    def __init__(self, model_dir: Path):
        from opt_core.reference import ReferenceOPTForCausalLM

        self.ref = ReferenceOPTForCausalLM.from_pretrained(model_dir)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.ref(ids, mask)
        return out.logits, list(out.hidden_states)  # HF's convention, like every backend

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
        return self.ref.greedy(ids, mask, max_new_tokens=new_tokens)


class _BackendAdapter:
    """`opt_<name>.OPTForCausalLM` called exactly as API.md documents it."""

    def __init__(self, name: str, model_dir: Path, dtype: str, quantize: str | None = None):
        module = importlib.import_module(f"opt_{name}")
        extra = {"quantize": quantize} if quantize else {}
        self.model = module.OPTForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **extra)
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


def backend_available(name: str) -> str | None:
    """None when `opt_<name>` and its framework import; otherwise why not, in one sentence."""
    if importlib.util.find_spec(f"opt_{name}") is None:
        return f"package opt_{name} is not installed"
    framework = {"torch": "torch", "tf": "tensorflow", "flax": "flax"}[name]
    if importlib.util.find_spec(framework) is None:
        return f"{framework} is not installed (pip install 'opt-reference[{name}]')"
    return None


def _one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type, first line and (for multi-line messages) last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_one(
    name: str, model_dir: Path, dtype: str, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
    quantize: str | None = None,
) -> tuple[BackendResult, _Run | None]:
    result = BackendResult(name, "ok")
    try:
        t0 = time.perf_counter()
        adapter: Any = (
            _ReferenceAdapter(model_dir) if name == REFERENCE else _BackendAdapter(name, model_dir, dtype, quantize)
        )
        t1 = time.perf_counter()
        logits, hidden = adapter.forward(ids, mask)
        t2 = time.perf_counter()
        tokens = adapter.generate(ids, mask, new_tokens) if new_tokens > 0 else ids.copy()
        t3 = time.perf_counter()
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in ("torch", "tensorflow", "keras", "jax", "jaxlib", "flax") or e.name == f"opt_{name}":
            return BackendResult(name, "missing", f"cannot import it: {e}"), None
        return BackendResult(name, "error", f"ModuleNotFoundError: {e}"), None
    except Exception as e:  # reported, never raised: one broken backend must not hide the others
        return BackendResult(name, "error", _one_line(e)), None
    result.load_s, result.forward_s, result.generate_s = t1 - t0, t2 - t1, t3 - t2
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
    return result, _Run(adapter, logits, hidden, tokens)


# ---------------------------------------------------------------- comparing two runs
def relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(max |actual - expected|, that divided by max |expected|) over positions where mask is 1."""
    keep = mask.astype(bool)
    a, e = actual[keep], expected[keep]
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return float("inf"), float("inf")
    diff = float(np.abs(a - e).max())
    return diff, diff / max(float(np.abs(e).max()), 1e-30)


def hidden_labels(count: int) -> list[str]:
    """Names of the hidden-state entries: embeddings, then layer 0 .. layer n-1."""
    return ["embeddings"] + [f"layer {i}" for i in range(count - 1)]


def _greedy(
    pair: PairResult, run_a: _Run, run_b: _Run, ids: np.ndarray, mask: np.ndarray, eos: int, tol: float
) -> None:
    prompt_len = ids.shape[1]
    new_a, new_b = run_a.tokens[:, prompt_len:], run_b.tokens[:, prompt_len:]
    first = None
    for row in range(ids.shape[0]):
        n = max(new_a.shape[1], new_b.shape[1])
        for pos in range(n):
            ta = int(new_a[row, pos]) if pos < new_a.shape[1] else None
            tb = int(new_b[row, pos]) if pos < new_b.shape[1] else None
            if ta is None and tb is None:
                break
            pair.greedy_compared += 1
            if ta != tb:
                if first is None:
                    first = (row, pos, ta, tb)
                break
            pair.greedy_matched += 1
            if ta == eos:  # both stopped here; what follows is padding or free continuation
                break
    if first is None:
        return
    row, pos, ta, tb = first
    pair.greedy_first_divergence = {"row": row, "position": pos}
    if ta is None or tb is None:
        pair.greedy_near_tie = False
        return
    # Re-run the baseline on the common prefix: a tie closer than the logit tolerance can break
    # either way in a correct implementation.
    real = ids[row][mask[row].astype(bool)]
    prefix = np.concatenate([real, new_a[row, :pos]])[None, :]
    logits, _ = run_a.model.forward(prefix, np.ones_like(prefix))
    last = logits[0, -1]
    gap = abs(float(last[ta]) - float(last[tb]))
    pair.greedy_near_tie = bool(gap <= 2 * tol * float(np.abs(last).max()))


def compare(
    a: str,
    b: str,
    run_a: _Run,
    run_b: _Run,
    ids: np.ndarray,
    mask: np.ndarray,
    tol: float,
    eos: int,
    hidden_decides: bool = True,
    greedy_decides: bool = True,
) -> PairResult:
    """Compare `b` against the baseline `a` (see the module docstring). With `hidden_decides`
    False, hidden states above the tolerance are reported (`first_divergent_layer`, `notes`) but
    do not fail the pair."""
    pair = PairResult(a, b, tol)
    if run_a.logits.shape != run_b.logits.shape:
        shapes = f"{list(run_a.logits.shape)} vs {list(run_b.logits.shape)}"
        pair.failures.append(f"logits shapes differ: {shapes}")
    else:
        pair.logits_max_abs, pair.logits_rel = relative_error(run_b.logits, run_a.logits, mask)
        if not pair.logits_rel <= tol:
            pair.failures.append(f"logits relative error {pair.logits_rel:.3g} > {tol:.3g}")

    if len(run_a.hidden) != len(run_b.hidden):
        pair.failures.append(f"{len(run_a.hidden)} vs {len(run_b.hidden)} hidden states")
    pair.hidden_labels = hidden_labels(min(len(run_a.hidden), len(run_b.hidden)))
    for label, ha, hb in zip(pair.hidden_labels, run_a.hidden, run_b.hidden):
        rel = relative_error(hb, ha, mask)[1] if ha.shape == hb.shape else None
        pair.hidden_rel.append(rel)
        if pair.first_divergent_layer is None and (rel is None or not rel <= tol):
            pair.first_divergent_layer = label
    if pair.first_divergent_layer is not None:
        i = pair.hidden_labels.index(pair.first_divergent_layer)
        rel = pair.hidden_rel[i]
        what = "shape differs" if rel is None else f"relative error {rel:.3g} > {tol:.3g}"
        message = f"hidden states diverge first at {pair.first_divergent_layer} ({what})"
        if hidden_decides or rel is None:
            pair.failures.append(message)
        else:
            pair.notes.append(message + "; diagnostic only at this dtype")

    _greedy(pair, run_a, run_b, ids, mask, eos, tol)
    if pair.greedy_first_divergence is not None and not pair.greedy_near_tie:
        d = pair.greedy_first_divergence
        message = f"greedy tokens differ at row {d['row']}, new token {d['position']}"
        (pair.failures if greedy_decides else pair.notes).append(message)
    pair.passed = not pair.failures
    return pair


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
        why_not = backend_available(name)
        if why_not is None:
            names.append(name)
        else:
            results.append(BackendResult(name, "missing", why_not))
            if not allow_missing:
                errors.append(f"backend {name} is missing: {why_not}")

    runs: dict[str, _Run] = {}
    for i, name in enumerate(names, 1):
        if progress is not None:
            progress(f"[{i}/{len(names)}] {name}: loading, forward pass and {new_tokens} greedy tokens ...")
        res, run = _run_one(name, model_dir, dtype, ids, mask, new_tokens, quantize)
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
