"""`verify_conversion`: re-read a converted folder and compare every tensor with its source."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.checkpoint import account_keys
from opt_core.formats import cast, open_reader, resolve_dtype, same_bits
from opt_core.formats.base import CheckpointError
from opt_core.params import Head


@dataclass
class VerifyResult:
    """What `verify` found: per-tensor comparison of the output with the (cast) source.

    Attributes:
        tensors: tensors compared.
        bit_exact: tensors whose output bytes equal the source cast to the output dtype.
        mismatched: names that differ.
        max_abs_diff: largest |output - source| over all tensors, in float64 (0 without a dtype change).
    """

    tensors: int = 0
    bit_exact: int = 0
    mismatched: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatched and self.bit_exact == self.tensors

    def summary(self) -> str:
        if self.ok:
            extra = ""
            if self.max_abs_diff:
                extra = f"; max |output - source| = {self.max_abs_diff:.3g} from the dtype cast"
            return f"verify: {self.tensors}/{self.tensors} tensors bit-exact{extra}"
        return f"verify FAILED: {len(self.mismatched)} of {self.tensors} tensors differ: {', '.join(self.mismatched)}"


def compare(job: Any, dst: Path, to: str, progress: bool = False) -> VerifyResult:
    """Compare the output folder `dst` with the planned conversion `job` (its reader still open)."""
    from conversion.plan import accounting_error, progress_bar

    with open_reader(dst, to, job.config) as out_reader:
        out_acc = account_keys(out_reader.shapes(), job.config, job.head)
        message = accounting_error(out_acc, dst, "the source's config")
        if message:
            raise CheckpointError(message)
        res = VerifyResult()
        written = {p.spec.name for p in job.plan}
        extra = sorted(set(out_acc.mapping) - written)
        if extra:  # e.g. a tied lm_head the output should not hold
            res.mismatched += [f"{n} (not in the source)" for n in extra]
        with progress_bar(sum(p.nbytes for p in job.plan), "verify", progress) as bar:
            for p in job.plan:
                res.tensors += 1
                if p.spec.name not in out_acc.mapping:
                    res.mismatched.append(f"{p.spec.name} (missing from the output)")
                    continue
                source = job.reader.read(job.mapping[p.spec.name])
                out = out_reader.read(out_acc.mapping[p.spec.name])
                if same_bits(out, cast(source, p.dtype)):
                    res.bit_exact += 1
                else:
                    res.mismatched.append(p.spec.name)
                if out.dtype != source.dtype:
                    diff = np.abs(out.astype(np.float64) - source.astype(np.float64))
                    res.max_abs_diff = max(res.max_abs_diff, float(diff.max()) if diff.size else 0.0)
                bar.update(p.nbytes)
        return res


def verify_conversion(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str | None = None,
    config: Any = None,
    head: Head | str | None = None,
    src_format: str | None = None,
    dtype: str | np.dtype | None = None,
    progress: bool = False,
) -> VerifyResult:
    """Re-read `dst` and compare every tensor with `src`, cast to `dtype` (None: no cast).

    Every tensor must be bit-exact against the source cast the same way (so bit-exact against the
    source itself when there is no dtype change); `max_abs_diff` reports the cast's rounding.
    The output's keys are accounted for strictly as well.
    """
    from conversion.plan import open_source, plan
    from opt_core.formats import detect_format

    src, dst = Path(src), Path(dst)
    to = to or detect_format(dst)
    reader, cfg, where, raw = open_source(src, src_format, config)
    with reader:
        job = plan(src, reader, cfg, where, raw, to, resolve_dtype(dtype), head)
        return compare(job, dst, to, progress)
