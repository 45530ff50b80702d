"""The small OPT shipped inside the package: `opt-shakespeare`, trained by this project.

    from opt_core import bundled
    folder = bundled.path()            # an HF-layout folder: config.json, model.safetensors, tokenizer

See `opt-shakespeare/README.md` (the model card) for the data, the training command and its numbers.
"""

from __future__ import annotations

from pathlib import Path

NAME = "opt-shakespeare"


def path() -> Path:
    """The bundled model's folder.

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    folder = Path(__file__).resolve().parent / NAME
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {folder}; reinstall the package (it ships as package data)"
        )
    return folder
