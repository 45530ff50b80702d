"""`opt info MODEL_DIR`: what a model folder holds, without loading any framework.

Config summary, parameter count (from the canonical table), the weight formats present, the
stored dtypes (read from safetensors headers), the tokenizer files and the size on disk.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from opt_cli.backends import resolve_model_dir
from opt_cli.main import register


def safetensors_dtypes(folder: Path) -> dict[str, int]:
    """{dtype: tensor count} over the folder's safetensors files (headers only)."""
    counts: Counter[str] = Counter()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, entry in header.items():
            if key != "__metadata__":
                counts[entry["dtype"]] += 1
    return dict(counts)


def describe(folder: Path) -> dict[str, Any]:
    """Everything `opt info` prints, as a dict."""
    from opt_core import OPTConfig, parameter_count
    from opt_core.checkpoint import formats_present

    config = OPTConfig.from_pretrained(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {
        "folder": str(folder),
        "config": config,
        "parameters": parameter_count(config),
        "formats": formats_present(folder),
        "stored_dtypes": safetensors_dtypes(folder),
        "config_dtype": config.torch_dtype,
        "tokenizer": [f for f in ("vocab.json", "merges.txt", "tokenizer_config.json") if (folder / f).is_file()],
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": sorted(str(p.relative_to(folder)) for p in files),
    }


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@register("info", "Describe a model folder: config, parameter count, formats, dtype, size on disk")
def _info(p: argparse.ArgumentParser):
    p.add_argument("model", help="model folder, or 'bundled'")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    def run(args: argparse.Namespace) -> int:
        folder = resolve_model_dir(args.model)
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
            ("size on disk", f"{_human(info['size_bytes'])} in {len(info['files'])} files"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        return 0

    return run
