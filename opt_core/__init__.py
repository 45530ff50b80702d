"""Framework-neutral core of the OPT reference implementation (imports no ML framework)."""

from opt_core.checkpoint import CheckpointError, KeyAccounting, account_keys
from opt_core.config import OPTConfig
from opt_core.generation_config import GenerationConfig, GenerationOptions, resolve_generation_options
from opt_core.masks import POSITION_OFFSET, causal_padding_mask, last_non_pad_indices, positions_from_mask
from opt_core.params import Head, Layout, ParamSpec, Role, parameter_count, parameter_table
from opt_core.presets import PRESETS
from opt_core.tokenizer import OPTTokenizer

__all__ = [
    "POSITION_OFFSET",
    "PRESETS",
    "CheckpointError",
    "GenerationConfig",
    "GenerationOptions",
    "Head",
    "KeyAccounting",
    "Layout",
    "OPTConfig",
    "OPTTokenizer",
    "ParamSpec",
    "Role",
    "account_keys",
    "causal_padding_mask",
    "last_non_pad_indices",
    "parameter_count",
    "parameter_table",
    "positions_from_mask",
    "resolve_generation_options",
]
