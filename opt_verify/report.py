"""What `opt verify` found (`VerifyReport`, one `BackendResult` per implementation, the pairs) and
its readable forms: a compact terminal table, Markdown, and JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt_verify.comparison import PairResult


@dataclass
class BackendResult:
    """One implementation's part of a run."""

    name: str
    status: str  # "ok", "missing" (not installed), "error" (failed to load or run), "skipped"
    message: str = ""
    load_s: float | None = None
    forward_s: float | None = None
    generate_s: float | None = None
    numerics: str = ""  # the loaded model's number-changing choices (quantization, matmul kernels)


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


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _greedy(p: PairResult) -> str:
    text = f"{p.greedy_matched}/{p.greedy_compared}"
    if p.greedy_first_divergence is not None:
        d = p.greedy_first_divergence
        text += f" (row {d['row']} pos {d['position']}{', near-tie' if p.greedy_near_tie else ''})"
    return text


def _worst_hidden(p: PairResult) -> str:
    known = [(r, label) for r, label in zip(p.hidden_rel, p.hidden_labels) if r is not None]
    if not p.hidden_rel:
        return "-"
    if not known:
        return "shapes differ"
    r, label = max(known)
    return f"{r:.2e} ({label})"


def _vs_tolerance(x: float | None, tol: float) -> str:
    if x is None:
        return "-"
    return f"{x:.2e} {'<=' if x <= tol else '>'} {tol:.0e}"


HEADER = ("pair", "logits max abs", "logits rel", "hidden worst", "first diverging", "greedy agree", "result")


def _pair_row(p: PairResult) -> tuple[str, ...]:
    return (
        f"{p.a} vs {p.b}",
        _num(p.logits_max_abs),
        _vs_tolerance(p.logits_rel, p.tolerance),
        _worst_hidden(p),
        p.first_divergent_layer or "none",
        _greedy(p),
        "PASS" if p.passed else "FAIL",
    )


def _backend_lines(report: VerifyReport) -> list[str]:
    lines = []
    for b in report.backends:
        if b.status == "ok":
            times = f"load {b.load_s:.2f}s, forward {b.forward_s:.2f}s, generate {b.generate_s:.2f}s"
            lines.append(f"{b.name}: ok ({times})" + (f"; {b.numerics}" if b.numerics else ""))
        else:
            lines.append(f"{b.name}: {b.status.upper()} - {b.message}")
    return lines


def format_table(report: VerifyReport) -> str:
    """The terminal report: a header line, one line per implementation, the pair table, the verdict."""
    cfg = report.config
    out = [
        f"opt verify {report.model_dir}",
        f"  {_count(report.parameters)} parameters, {cfg['num_hidden_layers']} layers, "
        f"hidden {cfg['hidden_size']}, dtype {report.dtype} (tolerance {report.tolerance:.0e} relative), "
        f"batch {report.batch_shape[0]}x{report.batch_shape[1]} left-padded ({report.input_source}), "
        f"{report.new_tokens} greedy tokens",
    ]
    out += ["  " + line for line in _backend_lines(report)]
    if report.pairs:
        rows = [HEADER] + [_pair_row(p) for p in report.pairs]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        fmt = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out.append("")
        out.append(fmt(rows[0]))
        out.append("  " + "  ".join("-" * w for w in widths))
        out += [fmt(r) for r in rows[1:]]
    failures = [f"{p.a} vs {p.b}: {f}" for p in report.pairs for f in p.failures] + report.errors
    notes = [f"{p.a} vs {p.b}: {n}" for p in report.pairs for n in p.notes]
    out.append("")
    out += [f"  note: {n}" for n in notes]
    if failures:
        out += [f"  - {f}" for f in failures]
    out.append(f"{'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f}s")
    return "\n".join(out)


def to_markdown(report: VerifyReport) -> str:
    """The report as a Markdown section: summary, implementations, pairs, per-layer errors."""
    cfg = report.config
    verdict = "PASSED" if report.passed else "FAILED"
    md = [
        f"# opt verify: {verdict}",
        "",
        f"- model: `{report.model_dir}` ({_count(report.parameters)} parameters, "
        f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']})",
        f"- dtype: {report.dtype}; tolerance {report.tolerance:.0e} relative "
        f"(max |a-b| / max |a| at real tokens; x2 between two backends): {report.tolerance_reason}",
        f"- batch: {report.batch_shape[0]} x {report.batch_shape[1]} left-padded, "
        f"from {report.input_source}; "
        f"{report.new_tokens} greedy tokens",
        f"- date: {report.date}, {report.seconds:.1f}s",
        "",
        "## Implementations",
        "",
    ]
    md += [f"- {line}" for line in _backend_lines(report)]
    if report.pairs:
        md += ["", "## Pairs", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        md += ["| " + " | ".join(_pair_row(p)) + " |" for p in report.pairs]
        labels = report.pairs[0].hidden_labels
        if labels:
            md += ["", "## Hidden-state relative error per layer", ""]
            md.append("| pair | " + " | ".join(labels) + " |")
            md.append("|---|" + "---|" * len(labels))
            for p in report.pairs:
                md.append(f"| {p.a} vs {p.b} | " + " | ".join(_num(r) for r in p.hidden_rel) + " |")
    failures = [f"{p.a} vs {p.b}: {f}" for p in report.pairs for f in p.failures] + report.errors
    if failures:
        md += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    notes = [f"{p.a} vs {p.b}: {n}" for p in report.pairs for n in p.notes]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(md) + "\n"


def write_markdown(report: VerifyReport, path: str | os.PathLike[str]) -> Path:
    """Write `to_markdown(report)` to `path`; returns the path."""
    path = Path(path)
    path.write_text(to_markdown(report), encoding="utf-8")
    return path


def write_json(report: VerifyReport, path: str | os.PathLike[str]) -> Path:
    """Write `report.to_json()` to `path`; returns the path."""
    path = Path(path)
    path.write_text(report.to_json() + "\n", encoding="utf-8")
    return path
