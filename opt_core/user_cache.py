"""Where the library keeps what it computes once and reuses (SmoothQuant factors): a folder of the
user's, never the model folder or the installed package (which may be read-only or shared).

    OPT_CACHE=/path        the folder itself (like HF_HOME for Hugging Face)
    XDG_CACHE_HOME=/path   then /path/opt-reference
    otherwise              ~/.cache/opt-reference
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "OPT_CACHE"
CACHE_NAME = "opt-reference"


def user_cache_dir(*parts: str) -> Path:
    """`$OPT_CACHE/<parts>` (else `$XDG_CACHE_HOME/opt-reference/<parts>`, else
    `~/.cache/opt-reference/<parts>`); not created here."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / CACHE_NAME
    return base.joinpath(*parts)
