"""`convert`: any OPT checkpoint format to any other, strictly, one tensor at a time.

    from conversion import convert
    report = convert("opt-350m/", "opt-350m-h5/", to="tf-h5", dtype="fp16", verify=True)
    print(report.summary())

The order of work is what makes it safe:
1. resolve the source's files and config once, and open its reader once, with the config
   (`conversion.plan.open_source`);
2. account for every key against the canonical table and make the checks every load makes
   (`conversion.plan.plan`): an unknown, missing, duplicated, misshapen or non-float tensor, or an
   untied head under a tied config, stops here before any file is created;
3. stream tensor by tensor (read, refuse NaN/inf, cast, write) into the temporary folder of a write
   transaction beside the destination (`opt_core.transaction`);
4. copy config, generation config and tokenizer files, then swap the finished folder in; with
   `verify=True`, compare every written tensor with the still-open source (`conversion.verify`).
Any error or Ctrl-C before the swap removes the temporary folder and leaves the destination as it
was. An existing non-empty destination is replaced only with `overwrite=True`, and only when it
holds nothing but what an earlier write owns (its `.opt-manifest.json`, or a plain model folder);
one a user creates while the conversion runs is never replaced. A destination that holds an input
file is refused outright.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conversion.install import write_side_files
from conversion.plan import check_paths, open_source, plan, progress_bar
from conversion.verify import VerifyResult, compare
from opt_core.checkpoint import check_finite
from opt_core.config import OPTConfig
from opt_core.formats import WRITE_FORMATS, Scratch, cast, dtype_name, resolve_dtype, same_bits, writer_class
from opt_core.formats.base import CheckpointError
from opt_core.formats.files import DEFAULT_SHARD_BYTES, parse_size
from opt_core.params import Head
from opt_core.transaction import WriteTransaction


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
    allow_non_finite: bool = False,
    adapter: str | os.PathLike[str] | None = None,
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
        allow_non_finite: convert NaN/infinite weights instead of refusing them.
        adapter: a LoRA adapter folder (PEFT's files): merged into the weights it adapts
            (W + scaling * B @ A in float32, then cast), so `dst` is the adapted model.
    Returns:
        A `ConversionReport` (`.summary()` for people).
    Raises:
        CheckpointError: unknown/missing/misshapen/non-float/non-finite tensors, a hostile, corrupt
            or truncated file, a failed verification (the output is then removed).
        FileExistsError: `dst` exists and is not empty and `overwrite` is False; with `overwrite`,
            `dst` holds entries no earlier write owns (`opt_core.transaction.ForeignFilesError`,
            listing them); `dst` was created by someone else while converting.
        opt_core.transaction.OutputError (an OSError): `dst` cannot be written.
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
    tx = WriteTransaction(dst, overwrite=overwrite, what="output folder")
    if not overwrite:
        tx.check_destination()  # before opening anything

    if adapter is not None and verify:
        raise ValueError("verify compares the output with the source, which merging an adapter changes; "
                         "check the merged model with `opt verify` instead")
    reader, cfg, config_source, raw = open_source(src, src_format, config)  # headers only
    try:
        deltas = _adapter_deltas(Path(adapter), cfg) if adapter is not None else {}
        check_paths(src, dst, reader, overwrite)
        tx.check_destination()
        job = plan(src, reader, cfg, config_source, raw, to, target_dtype, head)
        out_config = job.config
        out_dtype = dtype_name(job.plan[0].dtype) if job.plan else "float32"
        if target_dtype is not None:
            out_config = out_config.replace(torch_dtype=out_dtype)

        writer = None
        by_name = {p.spec.name: p for p in job.plan}
        total = sum(p.nbytes for p in job.plan)
        with tx:
            tmp = tx.path
            try:
                writer = writer_class(to)(tmp, job.plan, out_config, job.head, shard_bytes)
                scratch = Scratch()  # every writer consumes a fetched array before the next fetch
                with progress_bar(total, f"{reader.fmt} -> {to}", progress) as bar:
                    done = [0]

                    def fetch(name: str) -> np.ndarray:
                        p = by_name[name]
                        key = job.mapping[name]
                        arr = reader.read(key, out=scratch.array(p.spec.shape, reader.dtype(key)))
                        if not allow_non_finite:
                            check_finite(arr, key, reader.where(key))
                        if name in deltas:  # canonical [out, in] layout, like the delta
                            arr = (arr.astype(np.float32) + deltas.pop(name)).astype(arr.dtype)
                        arr = cast(arr, p.dtype)
                        done[0] += 1
                        bar.update(p.nbytes)
                        bar.set_postfix_str(f"{done[0]}/{len(job.plan)} tensors", refresh=False)
                        return arr

                    writer.write_all(fetch)
                if deltas:
                    raise ValueError(f"the adapter adapts {', '.join(sorted(deltas))}, which {src} does not hold")
                notes = []
                for name, target in job.tied_checks:
                    a, b = reader.read(job.mapping[name]), reader.read(job.mapping[target])
                    if not same_bits(a, b):  # check_tensors refused this already; kept as a guard
                        raise CheckpointError(f"{src}: {job.mapping[name]} differs from {job.mapping[target]}")
                    notes.append(f"{job.mapping[name]} equals {job.mapping[target]} (tied); {to} stores it once")
                files = [p.name for p in writer.commit()]
                files += write_side_files(src, tmp, job.raw_config, out_config, target_dtype, out_dtype)
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            tx.commit()
        report = ConversionReport(
            src=src, dst=dst, src_format=reader.fmt, to=to, head=job.head.value, config_source=job.config_source,
            tensors=len(job.plan), bytes_written=total, files=files, notes=notes,
            seconds=time.perf_counter() - t0,
        )
        if verify:
            report.verify = compare(job, dst, to, progress)
            if not report.verify.ok:
                raise CheckpointError(f"{dst}: {report.verify.summary()}")
        return report
    finally:
        reader.close()


def _adapter_deltas(folder: Path, cfg: OPTConfig) -> dict[str, np.ndarray]:
    """Canonical weight name -> scaling * B @ A (float32 [out, in]) of every adapted layer."""
    from opt_core.lora import TARGETABLE_MODULES, linear_shapes, load_adapter_files

    config, weights = load_adapter_files(folder, cfg.num_hidden_layers, linear_shapes(cfg.hidden_size, cfg.ffn_dim))
    return {
        f"decoder.layers.{layer}.{TARGETABLE_MODULES[module]}.weight": (b @ a) * np.float32(config.scaling)
        for (layer, module), (a, b) in weights.items()
    }
