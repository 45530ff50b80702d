"""`convert`: any OPT checkpoint format to any other, strictly, one tensor at a time.

    from conversion import convert
    report = convert("opt-350m/", "opt-350m-h5/", to="tf-h5", dtype="fp16", verify=True)
    print(report.summary())

The order of work is what makes it safe:
1. open the source and read only its headers; settle the config and the model kind;
2. account for every key against the canonical table (`opt_core.checkpoint.account_keys`): an
   unknown, missing, duplicated or misshapen tensor stops here, with all of them listed, before any
   file is created;
3. stream tensor by tensor (read, cast, write) into a temporary folder beside the destination;
4. copy config, generation config and tokenizer files, then rename the folder into place.
Any error after step 2 removes the temporary folder; an existing destination is replaced only with
`overwrite=True`, and a destination that holds an input file is refused outright.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conversion.formats import (
    WRITE_FORMATS,
    Reader,
    TensorPlan,
    cast,
    dtype_name,
    open_reader,
    resolve_dtype,
    same_bits,
    writer_class,
)
from opt_core.checkpoint import DEFAULT_SHARD_BYTES, CheckpointError, KeyAccounting, account_keys, parse_size
from opt_core.config import CONFIG_NAME, OPTConfig
from opt_core.formats import Scratch
from opt_core.params import Head, hf_name, parameter_table

# Files copied along with the weights when the source folder has them.
SIDE_FILES = (
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_ARCH_HEADS = {
    "OPTModel": Head.BASE,
    "OPTForCausalLM": Head.CAUSAL_LM,
    "OPTForSequenceClassification": Head.SEQUENCE_CLASSIFICATION,
    "OPTForQuestionAnswering": Head.QUESTION_ANSWERING,
}


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


@dataclass
class ConversionReport:
    """What `convert` did."""

    src: Path
    dst: Path
    src_format: str
    to: str
    head: str
    config_source: str
    tensors: int
    bytes_written: int
    files: list[str]
    notes: list[str]
    seconds: float
    verify: VerifyResult | None = None

    def summary(self) -> str:
        lines = [
            f"converted {self.src} ({self.src_format}) -> {self.dst} ({self.to}): {self.tensors} tensors, "
            f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s; model kind {self.head}; "
            f"config from {self.config_source}",
            f"files: {', '.join(self.files)}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        if self.verify is not None:
            lines.append(self.verify.summary())
        return "\n".join(lines)


# ---------------------------------------------------------------- config and model kind
def _load_config(config: OPTConfig | dict[str, Any] | str | os.PathLike[str] | None, reader: Reader,
                 src: Path) -> tuple[OPTConfig, str, dict[str, Any] | None]:
    """(config, where it came from, the raw config.json dict to copy or None)."""
    if isinstance(config, OPTConfig):
        return config, "the config argument", None
    if isinstance(config, dict):
        return OPTConfig.from_dict(config), "the config argument", None
    if config is not None:
        path = Path(config)
        cfg = OPTConfig.from_pretrained(path)
        return cfg, str(path / CONFIG_NAME if path.is_dir() else path), None
    if reader.config is not None:
        return reader.config, "the metaseq checkpoint's cfg", None
    folder = src if src.is_dir() else src.parent
    path = folder / CONFIG_NAME
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        return OPTConfig.from_json_file(path), str(path), raw
    if reader.fmt == "metaseq":
        raise ValueError(
            f"{src} is a metaseq checkpoint without a cfg (or with one this converter cannot read); "
            "pass the model's config with --config path/to/config.json"
        )
    raise FileNotFoundError(f"{src} has no {CONFIG_NAME}; pass one with --config path/to/config.json")


def infer_head(names: set[str], config: OPTConfig) -> Head:
    """The model kind a checkpoint holds: from its head tensors, else the config's architectures,
    else a causal LM (whose tied lm_head may be absent)."""
    if any(n.startswith("score.") for n in names):
        return Head.SEQUENCE_CLASSIFICATION
    if any(n.startswith("qa_outputs.") for n in names):
        return Head.QUESTION_ANSWERING
    archs = config.extra.get("architectures") or []
    if len(archs) == 1 and archs[0] in _ARCH_HEADS and _ARCH_HEADS[archs[0]] in (Head.BASE, Head.CAUSAL_LM):
        return _ARCH_HEADS[archs[0]]
    return Head.CAUSAL_LM


def _accounting_error(acc: KeyAccounting, src: Path, config_source: str, bad_dtypes: list[str]) -> str | None:
    """One message listing every problem, or None. For a conversion, head tensors the source lacks
    are missing (nothing would initialise them) and another head's tensors are unexpected."""
    missing = acc.missing + acc.new_head
    unexpected = acc.unexpected + acc.ignored
    if not (missing or unexpected or acc.misshapen or acc.duplicated or bad_dtypes):
        return None
    lines = [f"cannot convert {src}: its tensors do not match the config ({config_source}); nothing was written."]
    if unexpected:
        lines.append(f"  unknown tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
    for key, got, want in acc.misshapen:
        lines.append(f"  wrong shape: {key} is {list(got)}, the config implies {list(want)}")
    for a, b in acc.duplicated:
        lines.append(f"  the same parameter twice: {a} and {b}")
    if bad_dtypes:
        lines.append(f"  not floating point: {', '.join(bad_dtypes)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- paths
def _check_paths(src: Path, dst: Path, reader: Reader, overwrite: bool) -> None:
    dst_res = dst.resolve()
    for f in [src, *reader.files]:
        r = f.resolve()
        if r == dst_res or dst_res in r.parents:
            raise ValueError(f"refusing to write {dst}: it holds the input {f}; choose another output folder")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")


def _side_files(src: Path, tmp: Path, raw_config: dict[str, Any] | None, config: OPTConfig,
                dtype: np.dtype | None, out_dtype: str) -> list[str]:
    folder = src if src.is_dir() else src.parent
    if raw_config is not None:
        data = dict(raw_config)
        if dtype is not None:
            for key in ("torch_dtype", "dtype"):
                if key in data or key == "torch_dtype":
                    data[key] = out_dtype
    else:
        data = config.to_dict()
        data.setdefault("architectures", ["OPTForCausalLM"])
        data["torch_dtype"] = out_dtype
    (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copied = [CONFIG_NAME]
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
            copied.append(name)
    return copied


def _install(tmp: Path, dst: Path) -> None:
    """Move the finished temporary folder to `dst`, replacing an existing one last."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)


# ---------------------------------------------------------------- the converter
@dataclass
class _Job:
    src: Path
    reader: Reader
    config: OPTConfig
    config_source: str
    raw_config: dict[str, Any] | None
    head: Head
    mapping: dict[str, str]  # canonical name -> source key
    plan: list[TensorPlan]
    tied_checks: list[tuple[str, str]]  # (tied name, its target): in the source, not written


def _prepare(src: Path, to: str, dtype: np.dtype | None, config: Any, src_format: str | None,
             head: Head | str | None, reader: Reader) -> _Job:
    cfg, config_source, raw = _load_config(config, reader, src)
    reader.layout_config = cfg
    shapes = reader.shapes()
    head = Head(head) if head is not None else infer_head({k.removeprefix("model.") for k in shapes}, cfg)
    acc = account_keys(shapes, cfg, head)
    bad = [k for k in acc.mapping.values() if reader.dtype(k).kind not in "fV"] if acc.ok else []
    message = _accounting_error(acc, src, config_source, bad)
    if message:
        raise CheckpointError(message)
    writer_class(to).check_model(cfg, head)
    stores_tied = writer_class(to).stores_tied_lm_head
    plan, tied_checks = [], []
    for spec in parameter_table(cfg, head):
        if spec.name not in acc.mapping:
            continue  # tied and absent: the loader fills it
        if spec.tied_to is not None and not stores_tied:
            tied_checks.append((spec.name, spec.tied_to))
            continue
        key = acc.mapping[spec.name]
        plan.append(TensorPlan(spec, hf_name(spec.name, head), dtype or reader.dtype(key)))
    return _Job(src, reader, cfg, config_source, raw, head, dict(acc.mapping), plan, tied_checks)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str = "safetensors",
    dtype: str | np.dtype | None = None,
    shard_size: int | str | None = None,
    config: OPTConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
    src_format: str | None = None,
    head: Head | str | None = None,
) -> ConversionReport:
    """Convert the OPT checkpoint at `src` (a Hugging Face folder in any format, a single weights
    file, or a metaseq checkpoint) into a Hugging Face folder `dst` in format `to`.

    Args:
        src: the input folder (or file).
        dst: the output folder; created, or replaced with `overwrite=True`.
        to: "safetensors", "bin", "tf-h5" or "flax-msgpack".
        dtype: cast every tensor ("fp32", "fp16", "bf16"); None keeps each tensor's dtype.
        shard_size: safetensors/bin shard limit in bytes or "2GB"-style; default 5GB, as Hugging Face.
        config: the OPTConfig (object, dict, config.json path or folder); default the source's
            config.json, or for metaseq the checkpoint's cfg.
        overwrite: replace an existing `dst`.
        verify: re-read the output and compare every tensor with the source (see `VerifyResult`).
        progress: show a tqdm bar over bytes.
        src_format: read `src` as this format (default: detected; a folder holding several formats
            is read as safetensors, then bin, tf-h5, flax-msgpack).
        head: the model kind (default: from the tensors and the config's architectures).
    Returns:
        A `ConversionReport` (`.summary()` for people).
    Raises:
        CheckpointError: unknown/missing/misshapen tensors, a corrupt or truncated file, a failed
            verification (the output is then removed).
        FileExistsError: `dst` exists and `overwrite` is False.
        FileNotFoundError: no checkpoint at `src`.
        ValueError: bad arguments, or `dst` would overwrite an input.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if to not in WRITE_FORMATS:
        raise ValueError(f"cannot write format {to!r}; expected one of {', '.join(WRITE_FORMATS)}")
    target_dtype = resolve_dtype(dtype)
    if shard_size is not None and to not in ("safetensors", "bin"):
        raise ValueError(f"shard_size applies to safetensors and bin outputs only, not {to}")
    shard_bytes = parse_size(shard_size) if shard_size is not None else DEFAULT_SHARD_BYTES
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size!r}")
    if dst.exists() and not overwrite:  # before opening anything large
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")

    reader = open_reader(src, src_format)
    try:
        _check_paths(src, dst, reader, overwrite)
        job = _prepare(src, to, target_dtype, config, src_format, head, reader)
        out_config = job.config
        out_dtype = dtype_name(job.plan[0].dtype) if job.plan else "float32"
        if target_dtype is not None:
            out_config = out_config.replace(torch_dtype=out_dtype)

        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        writer = None
        by_name = {p.spec.name: p for p in job.plan}
        total = sum(p.nbytes for p in job.plan)
        try:
            writer = writer_class(to)(tmp, job.plan, out_config, job.head, shard_bytes)
            scratch = Scratch() if writer.reuses_fetched_arrays() else None
            with _progress(total, f"{reader.fmt} -> {to}", progress) as bar:
                done = [0]

                def fetch(name: str) -> np.ndarray:
                    p = by_name[name]
                    key = job.mapping[name]
                    buf = scratch.array(p.spec.shape, reader.dtype(key)) if scratch is not None else None
                    arr = cast(reader.read(key, out=buf), p.dtype)
                    if tuple(arr.shape) != p.spec.shape:  # the reader disagrees with its own header
                        raise CheckpointError(f"{src}: {job.mapping[name]} read as {list(arr.shape)}, "
                                              f"its header said {list(p.spec.shape)}")
                    done[0] += 1
                    bar.update(p.nbytes)
                    bar.set_postfix_str(f"{done[0]}/{len(job.plan)} tensors", refresh=False)
                    return arr

                writer.write_all(fetch)
            notes = []
            for name, target in job.tied_checks:
                a, b = reader.read(job.mapping[name]), reader.read(job.mapping[target])
                if not same_bits(a, b):
                    raise CheckpointError(
                        f"{src}: {job.mapping[name]} is tied to {job.mapping[target]} by the config but holds "
                        f"different values; {to} cannot store a separate LM head"
                    )
                notes.append(f"{job.mapping[name]} equals {job.mapping[target]} (tied); {to} stores it once")
            files = [p.name for p in writer.commit()]
            files += _side_files(src, tmp, job.raw_config, out_config, target_dtype, out_dtype)
        except BaseException:
            if writer is not None:
                writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _install(tmp, dst)
    finally:
        reader.close()

    report = ConversionReport(
        src=src, dst=dst, src_format=reader.fmt, to=to, head=job.head.value, config_source=job.config_source,
        tensors=len(job.plan), bytes_written=total, files=files, notes=notes,
        seconds=time.perf_counter() - t0,
    )
    if verify:
        report.verify = verify_conversion(src, dst, to=to, config=job.config, head=job.head,
                                          src_format=reader.fmt, dtype=target_dtype, progress=progress)
        if not report.verify.ok:
            raise CheckpointError(f"{dst}: {report.verify.summary()}")
    return report


def verify_conversion(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str | None = None,
    config: OPTConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
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
    src, dst = Path(src), Path(dst)
    target_dtype = resolve_dtype(dtype)
    src_reader = open_reader(src, src_format)
    out_reader = open_reader(dst, to)
    try:
        job = _prepare(src, to or out_reader.fmt, target_dtype, config, src_format, head, src_reader)
        out_reader.layout_config = job.config
        out_acc = account_keys(out_reader.shapes(), job.config, job.head)
        message = _accounting_error(out_acc, dst, "the source's config", [])
        if message:
            raise CheckpointError(message)
        res = VerifyResult()
        written = {p.spec.name for p in job.plan}
        extra = sorted(set(out_acc.mapping) - written)
        if extra:  # e.g. a tied lm_head the output should not hold
            res.mismatched += [f"{n} (not in the source)" for n in extra]
        with _progress(sum(p.nbytes for p in job.plan), "verify", progress) as bar:
            for p in job.plan:
                res.tensors += 1
                if p.spec.name not in out_acc.mapping:
                    res.mismatched.append(f"{p.spec.name} (missing from the output)")
                    continue
                source = src_reader.read(job.mapping[p.spec.name])
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
    finally:
        src_reader.close()
        out_reader.close()
