"""Checkpoint conversion between every OPT format: Hugging Face safetensors (single or sharded),
pytorch_model.bin, tf_model.h5, flax_model.msgpack, and metaseq (read only).

    from conversion import convert
    convert("in/", "out/", to="flax-msgpack", dtype="bf16", verify=True)

Strict (every tensor accounted for against the canonical table before anything is written),
streaming (one tensor at a time), atomic (temporary folder, renamed at the end).
"""

from conversion.convert import ConversionReport, VerifyResult, convert, infer_head, verify_conversion
from conversion.formats import READ_FORMATS, WRITE_FORMATS, detect_source_format, open_reader

__all__ = [
    "READ_FORMATS",
    "WRITE_FORMATS",
    "ConversionReport",
    "VerifyResult",
    "convert",
    "detect_source_format",
    "infer_head",
    "open_reader",
    "verify_conversion",
]
