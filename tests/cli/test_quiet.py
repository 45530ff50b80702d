"""`opt` commands print no framework log noise (TensorFlow / absl / oneDNN / XLA /
CUDA-stub lines, tf.function retracing, Keras UserWarnings); `--verbose` lets it through; warnings of
this project still show. Through the real entry point, with the environment a user's shell has."""

from __future__ import annotations

import re
import warnings

import pytest

from tests.cli.entry import lines, opt

# Independent of opt_cli.quiet's own patterns: what the frameworks print when nobody silences them.
NOISE = re.compile(
    r"absl::InitializeLog|oneDNN|cpu_feature_guard|^[IWE]\d{4} \d\d:|TensorFlow binary is optimized"
    r"|rebuild TensorFlow|retracing|UserWarning|DeprecationWarning|FutureWarning|cuda|CUDA|TensorRT|XLA service"
    r"|WARNING:absl|WARNING:tensorflow|Platform '|jaxlib"
)


def noise(stderr: str) -> list[str]:
    return [ln for ln in lines(stderr) if NOISE.search(ln)]


@pytest.mark.tf
@pytest.mark.flax
def test_demo_in_tf_and_flax_prints_no_framework_noise(tiny_model_dir):
    proc = opt("demo", "--model", tiny_model_dir, "--backends", "tf,flax", "--max-new-tokens", "3",
               "--prompt", "ROMEO:", "--threads", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "greedy texts agree" in proc.stdout
    assert noise(proc.stderr) == [], proc.stderr


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.flax
@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_every_command_is_quiet_and_verbose_lets_the_noise_through(tiny_model_dir, tmp_path, backend):
    text = tiny_model_dir / "text.txt"
    (tmp_path / "prompts.txt").write_text("ROMEO:\n")
    runs = {
        "generate": ["generate", "--model", tiny_model_dir, "--backend", backend, "--max-new-tokens", "4", "--stream"],
        "eval-ppl": ["eval-ppl", "--model", tiny_model_dir, "--backend", backend, "--text", text,
                     "--max-tokens", "100", "--no-progress"],
        "train": ["train", "--corpus", text, "--out", tmp_path / "run", "--backend", backend, "--vocab-size", "300",
                  "--hidden-size", "16", "--layers", "1", "--heads", "2", "--ffn-dim", "32", "--context", "16",
                  "--steps", "3", "--batch-size", "2", "--warmup", "1", "--eval-every", "2"],
        "verify": ["verify", tiny_model_dir, "--backends", f"torch,{backend}", "--new-tokens", "2",
                   "--prompts", tmp_path / "prompts.txt"],
    }
    for name, argv in runs.items():
        proc = opt(*argv)
        assert proc.returncode == 0, (name, proc.stderr)
        assert noise(proc.stderr) == [], (name, proc.stderr)
        if name == "generate":  # --stream reached the backend's generate: the rate comes from the streamer
            assert "after the first token" in proc.stderr and "takes no streamer" not in proc.stderr, proc.stderr
    if backend == "tf":  # TensorFlow's start-up lines are there for whoever asks
        proc = opt("--verbose", *runs["generate"])
        assert proc.returncode == 0 and noise(proc.stderr), proc.stderr


def test_only_framework_warnings_are_filtered(monkeypatch):
    """`configure(verbose=False)` ignores Keras / TensorFlow / JAX warnings, never this project's."""
    from opt_cli import quiet

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    quiet.configure(verbose=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet.configure(verbose=False)
        for module in ("keras.src.layers.core", "tensorflow.python.eager", "jax._src.api", "opt_tf.modeling",
                       "opt_core.checkpoint"):
            warnings.warn_explicit(f"from {module}", UserWarning, "x.py", 1, module=module)
    assert sorted(str(w.message) for w in seen) == ["from opt_core.checkpoint", "from opt_tf.modeling"]
    assert quiet.is_noise("W0000 00:00:1796135472.812769    7322 port.cc:153] oneDNN custom operations are on.")
    assert not quiet.is_noise("opt generate: the prompt is empty")
