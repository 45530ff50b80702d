"""The nine published OPT sizes as data.

Source: metaseq `projects/OPT/opt_job_constants.py` (layers, heads, d_model; ffn = 4 x d_model,
vocab 50272, context 2048) cross-checked with the Hugging Face `config.json` of each `facebook/opt-*`
repository. opt-350m is the only post-LayerNorm model and the only one with a 512-wide token
embedding projected in and out of the 1024-wide decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Preset:
    layers: int
    heads: int
    d_model: int
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


# name -> preset; one row per released model.
PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        "opt-125m": Preset(layers=12, heads=12, d_model=768),
        "opt-350m": Preset(
            layers=24, heads=16, d_model=1024, do_layer_norm_before=False, word_embed_proj_dim=512
        ),
        "opt-1.3b": Preset(layers=24, heads=32, d_model=2048),
        "opt-2.7b": Preset(layers=32, heads=32, d_model=2560),
        "opt-6.7b": Preset(layers=32, heads=32, d_model=4096),
        "opt-13b": Preset(layers=40, heads=40, d_model=5120),
        "opt-30b": Preset(layers=48, heads=56, d_model=7168),
        "opt-66b": Preset(layers=64, heads=72, d_model=9216),
        "opt-175b": Preset(layers=96, heads=96, d_model=12288),
    }
)

# Explicit aliases only: a name is matched exactly, never by substring.
ALIASES: MappingProxyType[str, str] = MappingProxyType(
    {alias: name for name in PRESETS for alias in (name, name[len("opt-"):], "facebook/" + name)}
)
