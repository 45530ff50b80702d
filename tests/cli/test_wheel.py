"""The wheel installs next to a user's own frameworks.

Fast: build the wheel (no dependencies, no build isolation) from a copy of the sources and read it:
extras are ranges (no exact torch / TensorFlow pin), every third-party module the packages import is
declared, each package ships `py.typed`, and the bundled model is package data.

Slow: a fresh virtual environment that already holds a torch other than this project's pin gets the
wheel with `[torch]`; pip must keep the user's torch, and `opt_torch` must import and run on it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.cli.entry import ROOT

PACKAGES = ("opt_core", "opt_torch", "opt_tf", "opt_flax", "conversion", "opt_cli", "opt_verify")
# import name -> distribution name, where they differ
DIST_OF = {"ml_dtypes": "ml-dtypes", "tensorflow": "tensorflow", "yaml": "pyyaml"}
# imported only behind an explicit opt-in, with a clear message when missing
OPTIONAL_IMPORTS = {"flash_attn": "attn_implementation='flash_attention_2' (CUDA only)",
                    "pytest": "opt_verify.pytest_plugin, loaded by the user's own pytest"}


def build_wheel(dest: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the sources (no build/ or egg-info in the tree)."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dest), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dest.glob("opt_reference-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def requires(wheel: Path) -> list[tuple[str, str, str | None]]:
    """(distribution, specifier, extra or None) of every Requires-Dist line."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist: "):
            m = re.match(r"Requires-Dist: ([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*([^;]*)(?:;\s*extra\s*==\s*\"(\w+)\")?",
                         line)
            assert m, line
            out.append((m.group(1).lower().replace("_", "-"), m.group(3).strip(), m.group(4)))
    return out


def third_party_imports(wheel: Path) -> dict[str, set[str]]:
    """Top-level modules imported anywhere in the wheel's Python files that are neither stdlib nor ours."""
    found: dict[str, set[str]] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not name.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(z.read(name))):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                for mod in mods:
                    top = mod.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                        found.setdefault(top, set()).add(name)
    return found


def test_extras_are_ranges_and_every_import_is_declared(wheel):
    reqs = requires(wheel)
    pinned = [(d, spec) for d, spec, _ in reqs if "==" in spec]
    assert pinned == [], f"exact pins belong in requirements/*.txt, not the wheel: {pinned}"
    names = {d for d, _, _ in reqs}
    assert "tensorflow-cpu" not in names  # a GPU machine's TensorFlow must satisfy .[tf]
    by_extra = {(d, extra) for d, _, extra in reqs}
    for dist, extra in [("torch", "torch"), ("tensorflow", "tf"), ("h5py", "tf"), ("keras", "tf"), ("jax", "flax"),
                        ("flax", "flax"), ("optax", "flax"), ("msgpack", "flax"), ("ml-dtypes", None),
                        ("numpy", None), ("safetensors", None), ("tokenizers", None), ("tqdm", None)]:
        assert (dist, extra) in by_extra, (dist, extra)
    for module, files in sorted(third_party_imports(wheel).items()):
        if module in OPTIONAL_IMPORTS:
            continue
        dist = DIST_OF.get(module, module).lower().replace("_", "-")
        assert dist in names, f"{module} is imported by {sorted(files)[:3]} but not declared in pyproject.toml"


def test_wheel_ships_py_typed_and_the_bundled_model(wheel):
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
    for pkg in PACKAGES:
        assert f"{pkg}/py.typed" in files, pkg
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json",
                 "README.md"):
        assert f"opt_core/bundled/opt-shakespeare/{name}" in files, name


# ---------------------------------------------------------------- the real install (minutes)
OTHER_TORCH = os.environ.get("OPT_WHEEL_TEST_TORCH", "torch==2.14.1")  # the project pins 2.13.0


@pytest.mark.slow
@pytest.mark.torch
def test_wheel_installs_next_to_a_users_other_torch(wheel, tmp_path):
    venv = tmp_path / "user-venv"
    py = venv / "bin" / "python"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, OTHER_TORCH], check=True, timeout=1800)  # the user's torch, before ours
    before = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], check=True,
                            capture_output=True, text=True).stdout.strip()
    subprocess.run([*pip, f"{wheel}[torch]"], check=True, timeout=900)
    probe = (
        "import numpy as np, torch, opt_torch\n"
        "from opt_core import OPTConfig\n"
        "m = opt_torch.OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,"
        " num_attention_heads=2, max_position_embeddings=32)).eval()\n"
        "out = m.generate(np.array([[2, 5, 6]]), max_new_tokens=3)\n"
        "print(torch.__version__, tuple(out.shape))\n"
    )
    proc = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    version, shape = proc.stdout.split(" ", 1)
    assert version == before and not version.startswith("2.13.0"), (before, version)
    assert shape.strip() == "(1, 6)"
    print(f"fresh venv + {OTHER_TORCH} + wheel[torch] + import: {time.perf_counter() - t0:.0f} s")
