"""`opt info MODEL`: what a model folder holds, without loading any framework.

Config summary, parameter count (from the canonical table), the weight formats present, the
stored dtypes (read from safetensors headers), the tokenizer files and the size on disk.

Everything read is validated first: a weight file that is a folder, a FIFO or another special file,
or a safetensors header that is truncated or malformed, is a one-line error (exit 1). No file is
opened before `stat` says it is a regular file, so a FIFO never blocks the command.
"""

from __future__ import annotations

import argparse
import json
import stat
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from opt_cli.errors import InputError
from opt_cli.paths import MODEL_FOLDER, model_folder
from opt_cli.registry import register
from opt_core.quantization import SMOOTHING_FILE

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.h5", "*.msgpack", "*.index.json", "*.pt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def _regular(path: Path) -> Any:
    """`os.stat_result` of `path`, or an InputError when it is not a regular file."""
    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path} is a folder, not a weights file")
    if stat.S_ISFIFO(st.st_mode):
        raise InputError(f"{path} is a FIFO (named pipe), not a weights file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path} is not a regular file")
    return st


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, validated (InputError otherwise)."""
    size = _regular(path).st_size
    if size < 8:
        raise InputError(f"{path}: truncated safetensors file ({size} bytes; the header length alone is 8)")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            # The claimed length is not quoted: for a file that is no safetensors it is 8 of its bytes.
            raise InputError(f"{path}: truncated or malformed safetensors header (its length field exceeds "
                             f"the {size - 8:,} bytes after it)")
        raw = f.read(n)
    from opt_core.safe_files import parse_json

    header = parse_json(raw, f"{path}: malformed safetensors header: it", InputError)
    if not isinstance(header, dict):
        raise InputError(f"{path}: malformed safetensors header (a JSON {type(header).__name__}, not an object)")
    data_bytes = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
              and len(entry["data_offsets"]) == 2 and all(isinstance(o, int) for o in entry["data_offsets"]))
        if not ok:
            raise InputError(f"{path}: malformed safetensors header (entry {key!r} lacks dtype/shape/data_offsets)")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= data_bytes:
            raise InputError(f"{path}: truncated safetensors file: {key!r} ends at byte {end:,} of a data "
                             f"section of {data_bytes:,}")
    return header


def safetensors_dtypes(folder: Path) -> dict[str, int]:
    """{dtype: tensor count} over the folder's safetensors files (headers only)."""
    counts: Counter[str] = Counter()
    from opt_core.safe_files import check_inside

    for path in sorted(folder.glob("*.safetensors")):
        check_inside(path, folder, InputError, "weight file")  # as every loader: no link out of the folder
        if path.name == SMOOTHING_FILE:  # SmoothQuant factors, shown on their own (`smoothing`)
            continue
        for key, entry in safetensors_header(path).items():
            if key != "__metadata__":
                counts[entry["dtype"]] += 1
    return dict(counts)


def describe(folder: Path) -> dict[str, Any]:
    """Everything `opt info` prints, as a dict."""
    from opt_core import OPTConfig, parameter_count
    from opt_core.checkpoint import formats_present

    for pattern in WEIGHT_PATTERNS:  # weight-named entries must be regular files
        for path in sorted(folder.glob(pattern)):
            _regular(path)
    try:
        config = OPTConfig.from_pretrained(folder)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / 'config.json'}: not a usable OPT config ({e})") from None
    files = []
    for p in folder.rglob("*"):
        try:
            if stat.S_ISREG(p.stat().st_mode):
                files.append(p)
        except OSError:
            continue
    return {
        "folder": str(folder),
        "config": config,
        "parameters": parameter_count(config),
        "formats": formats_present(folder),
        "stored_dtypes": safetensors_dtypes(folder),
        "config_dtype": config.torch_dtype,
        "tokenizer": [f for f in ("vocab.json", "merges.txt", "tokenizer_config.json") if (folder / f).is_file()],
        "smoothing": _smoothing(folder),
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": sorted(str(p.relative_to(folder)) for p in files),
    }


def _smoothing(folder: Path) -> dict[str, Any] | None:
    """The SmoothQuant factor file beside the weights (header only), or None."""
    path = folder / SMOOTHING_FILE
    if not path.exists():
        return None
    _regular(path)
    header = safetensors_header(path)
    meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    return {"file": SMOOTHING_FILE, "groups": sum(1 for k in header if k != "__metadata__"),
            "bound_to_weights": "weights_sha256" in meta, "size_bytes": path.stat().st_size}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@register("info", "Describe a model folder: config, parameter count, formats, dtype, size on disk")
def _info(p: argparse.ArgumentParser):
    p.add_argument("model", metavar="MODEL", help=MODEL_FOLDER)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    def run(args: argparse.Namespace) -> int:
        folder = model_folder(args.model, what="MODEL")
        info = describe(folder)
        c = info["config"]
        if args.json:
            out = dict(info, config=c.to_dict())
            print(json.dumps(out, indent=2))
            return 0
        layer_norm = "pre-LN" if c.do_layer_norm_before else "post-LN"
        rows = [
            ("folder", info["folder"]),
            ("parameters", f"{info['parameters']:,}"),
            ("layers x width", f"{c.num_hidden_layers} x {c.hidden_size} ({c.num_attention_heads} heads of "
                               f"{c.head_dim}), ffn {c.ffn_dim}, {c.activation_function}"),
            ("vocabulary", f"{c.vocab_size}"),
            ("context", f"{c.max_position_embeddings} tokens"),
            ("layout", layer_norm + (f", word_embed_proj_dim {c.embed_dim}" if c.has_projections else "")
             + ("" if c.enable_bias else ", no biases")
             + ("" if c.layer_norm_elementwise_affine else ", LayerNorm without affine")),
            ("formats", ", ".join(info["formats"]) or "none (no weights found)"),
            ("dtype", ", ".join(f"{k} x{v}" for k, v in info["stored_dtypes"].items()) or "(not safetensors)")
            if info["stored_dtypes"] else ("dtype", f"{info['config_dtype'] or 'unknown'} (config)"),
            ("config torch_dtype", str(info["config_dtype"])),
            ("tokenizer", ", ".join(info["tokenizer"]) or "missing"),
            ("smoothing", "none" if info["smoothing"] is None else
             f"{SMOOTHING_FILE}: SmoothQuant factors for w8a8, {info['smoothing']['groups']} groups "
             f"({_human(info['smoothing']['size_bytes'])}; not weights"
             + ("" if info["smoothing"]["bound_to_weights"] else "; not bound to these weights: refused on load")
             + ")"),
            ("size on disk", f"{_human(info['size_bytes'])} in {len(info['files'])} files"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        return 0

    return run
