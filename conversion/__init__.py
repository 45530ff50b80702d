"""Checkpoint conversion between every OPT format: Hugging Face safetensors (single or sharded),
pytorch_model.bin, tf_model.h5, flax_model.msgpack, and metaseq (read only).

    from conversion import convert
    convert("in/", "out/", to="flax-msgpack", dtype="bf16", verify=True)

Strict (every tensor accounted for against the canonical table before anything is written),
streaming (one tensor at a time), atomic (temporary folder, renamed at the end). The formats
themselves are `opt_core.formats`; this package plans (`plan`), installs (`install`), verifies
(`verify`) and drives them (`convert`).
"""

from conversion.convert import ConversionReport, convert
from conversion.plan import infer_head
from conversion.verify import VerifyResult, verify_conversion
from opt_core.formats import READ_FORMATS, WRITE_FORMATS, detect_format, open_reader

detect_source_format = detect_format

__all__ = [
    "READ_FORMATS",
    "WRITE_FORMATS",
    "ConversionReport",
    "VerifyResult",
    "convert",
    "detect_format",
    "detect_source_format",
    "infer_head",
    "open_reader",
    "verify_conversion",
]
