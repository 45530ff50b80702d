"""Planning a conversion before anything is written: the config (argument, config.json or a
metaseq cfg, and a disagreement between the last two is an error), the model kind, strict key
accounting and the checks every load makes (`opt_core.checkpoint.check_tensors`), and the list of
tensors the writer will receive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.checkpoint import KeyAccounting, account_keys, check_bytes_on_disk, check_tensors
from opt_core.config import CONFIG_NAME, OPTConfig
from opt_core.formats import Reader, TensorPlan, detect_format, open_reader, writer_class
from opt_core.formats.base import CheckpointError, check_regular_file
from opt_core.params import Head, hf_name, parameter_table
from opt_core.safe_files import MAX_CONFIG_BYTES, read_json

_ARCH_HEADS = {
    "OPTModel": Head.BASE,
    "OPTForCausalLM": Head.CAUSAL_LM,
    "OPTForSequenceClassification": Head.SEQUENCE_CLASSIFICATION,
    "OPTForQuestionAnswering": Head.QUESTION_ANSWERING,
}
# Fields a metaseq cfg decides; config.json beside it must agree on them.
_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
                        "max_position_embeddings", "do_layer_norm_before", "remove_final_layer_norm",
                        "word_embed_proj_dim", "enable_bias", "layer_norm_elementwise_affine", "activation_function")


@dataclass
class Job:
    """A planned conversion: the opened source, its config and kind, and what the writer gets."""

    src: Path
    reader: Reader
    config: OPTConfig
    config_source: str
    raw_config: dict[str, Any] | None
    head: Head
    mapping: dict[str, str]  # canonical name -> source key
    plan: list[TensorPlan]
    tied_checks: list[tuple[str, str]]  # (tied name, its target): equal in the source, not written


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


def _config_json(src: Path) -> Path | None:
    path = (src if src.is_dir() else src.parent) / CONFIG_NAME
    return check_regular_file(path) if path.exists() else None


def _explicit_config(config: Any) -> tuple[OPTConfig, str] | None:
    if config is None:
        return None
    if isinstance(config, OPTConfig):
        return config, "the config argument"
    if isinstance(config, dict):
        return OPTConfig.from_dict(config), "the config argument"
    path = Path(config)
    return OPTConfig.from_pretrained(path), str(path / CONFIG_NAME if path.is_dir() else path)


def _disagreement(a: OPTConfig, b: OPTConfig) -> list[str]:
    return [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}"
            for f in _ARCHITECTURE_FIELDS if getattr(a, f) != getattr(b, f)]


def open_source(src: Path, src_format: str | None, config: Any) -> tuple[Reader, OPTConfig, str, dict | None]:
    """Resolve the source's files and config once, then open its reader once, with the config.

    Returns (reader, config, where the config came from, the raw config.json to copy or None).
    Raises:
        CheckpointError: a metaseq cfg and the config.json beside it disagree.
        FileNotFoundError: no checkpoint, or no config for it.
    """
    fmt = src_format or detect_format(src)
    explicit = _explicit_config(config)
    json_path = _config_json(src) if explicit is None else None
    raw = (read_json(json_path, what="config file", max_bytes=MAX_CONFIG_BYTES, expect=dict)
           if json_path is not None else None)
    if fmt == "metaseq":
        reader = open_reader(src, fmt)
        try:
            if explicit is not None:
                return reader, explicit[0], explicit[1], None
            if reader.config is not None and json_path is not None:
                beside = OPTConfig.from_json_file(json_path)
                diff = _disagreement(reader.config, beside)
                if diff:
                    raise CheckpointError(
                        f"{src}: the metaseq checkpoint's cfg and {json_path} disagree ({'; '.join(diff)}); "
                        "pass the right one with --config"
                    )
            if reader.config is not None:
                return reader, reader.config, "the metaseq checkpoint's cfg", None
            if json_path is not None:
                return reader, OPTConfig.from_json_file(json_path), str(json_path), None
            raise ValueError(
                f"{src} is a metaseq checkpoint without a cfg (or with one this converter cannot read); "
                "pass the model's config with --config path/to/config.json"
            )
        except BaseException:
            reader.close()
            raise
    if explicit is not None:
        cfg, where = explicit
    elif json_path is not None:
        cfg, where = OPTConfig.from_json_file(json_path), str(json_path)
    else:
        raise FileNotFoundError(f"{src} has no {CONFIG_NAME}; pass one with --config path/to/config.json")
    return open_reader(src, fmt, cfg), cfg, where, raw


def accounting_error(acc: KeyAccounting, src: Path, config_source: str) -> str | None:
    """One message listing every problem, or None. For a conversion, head tensors the source lacks
    are missing (nothing would initialise them) and another head's tensors are unexpected."""
    missing = acc.missing + acc.new_head
    unexpected = acc.unexpected + acc.ignored
    if not (missing or unexpected or acc.misshapen or acc.duplicated):
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
    return "\n".join(lines)


def plan(src: Path, reader: Reader, cfg: OPTConfig, config_source: str, raw: dict | None, to: str,
         dtype: np.dtype | None, head: Head | str | None) -> Job:
    """Account for every source tensor and list what the writer of `to` receives.

    Raises:
        CheckpointError: unknown/missing/misshapen tensors, non-float weights, an untied head under
            a tied config; ValueError: the format cannot hold this model.
    """
    check_bytes_on_disk(reader, cfg)  # a config far larger than the files: refused before its table
    shapes = reader.shapes()
    head = Head(head) if head is not None else infer_head({k.removeprefix("model.") for k in shapes}, cfg)
    acc = account_keys(shapes, cfg, head)
    message = accounting_error(acc, src, config_source)
    if message:
        raise CheckpointError(message)
    check_tensors(reader, acc, cfg)
    writer_class(to).check_model(cfg, head)
    stores_tied = writer_class(to).stores_tied_lm_head
    tensors, tied_checks = [], []
    for spec in parameter_table(cfg, head):
        if spec.name not in acc.mapping:
            continue  # tied and absent: the loader fills it
        if spec.tied_to is not None and not stores_tied:
            tied_checks.append((spec.name, spec.tied_to))
            continue
        key = acc.mapping[spec.name]
        tensors.append(TensorPlan(spec, hf_name(spec.name, head), dtype or reader.dtype(key)))
    return Job(src, reader, cfg, config_source, raw, head, dict(acc.mapping), tensors, tied_checks)


def check_paths(src: Path, dst: Path, reader: Reader, overwrite: bool) -> None:
    """Refuse a destination that holds an input (what may be replaced is the write transaction's
    rule, `opt_core.transaction`)."""
    dst_res = dst.resolve()
    for f in [src, *reader.files]:
        r = f.resolve()
        if r == dst_res or dst_res in r.parents:
            raise ValueError(f"refusing to write {dst}: it holds the input {f}; choose another output folder")


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over bytes (disabled unless `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)
