"""The `opt verify` engine, report and CLI, on the float64 reference plus a stand-in backend (no
framework needed, so this runs everywhere)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from opt_cli.main import main as opt_main
from opt_core import OPTConfig
from opt_verify import TOLERANCES, VerifyError, format_table, to_markdown, verify, write_json, write_markdown
from opt_verify.testing import EquivalenceError, assert_equivalent
from tests.variants import TOLERANCE
from tests.verify.conftest import corrupt_copy, write_checkpoint

# the module itself: the package exports a function of the same name
engine = importlib.import_module("opt_verify.verify")


def test_tolerance_table_matches_the_suite():
    for dtype, tol in TOLERANCE.items():
        assert TOLERANCES[dtype].relative == tol, dtype
    assert all(t.reason for t in TOLERANCES.values())


@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_proj_ckpt"])
def test_agreeing_backends_pass(fake_backends, which, request):
    folder = request.getfixturevalue(which)
    report = verify(folder, backends=("torch", "tf", "flax"), new_tokens=8)
    assert report.passed, format_table(report)
    assert [b.name for b in report.backends] == ["reference", "torch", "tf", "flax"]
    assert len(report.pairs) == 6  # reference vs 3, then the three backend pairs
    ref_pairs = [p for p in report.pairs if p.a == "reference"]
    assert all(p.tolerance == TOLERANCES["float32"].relative for p in ref_pairs)
    assert all(p.tolerance == 2 * TOLERANCES["float32"].relative for p in report.pairs if p.a != "reference")
    for p in report.pairs:
        assert 0 < p.logits_rel < 1e-6 or p.logits_rel == 0
        assert p.first_divergent_layer is None
        assert 3 <= p.greedy_matched == p.greedy_compared <= 3 * 8  # a row may stop at </s>
        assert p.hidden_labels == ["embeddings", "layer 0", "layer 1"]
    assert report.input_source == "default ids" and report.batch_shape == [3, 9]


def test_corrupted_layer_is_named(fake_backends, tiny_ckpt, tmp_path):
    bad = corrupt_copy(tiny_ckpt, tmp_path / "bad", "model.decoder.layers.1.fc1.weight")
    fake_backends["tf"] = bad  # tf's "loader" reads a checkpoint whose layer 1 is off
    report = verify(tiny_ckpt, backends=("torch", "tf"), new_tokens=8)
    assert not report.passed
    by_pair = {(p.a, p.b): p for p in report.pairs}
    assert by_pair["reference", "torch"].passed
    for key in (("reference", "tf"), ("torch", "tf")):
        p = by_pair[key]
        assert not p.passed
        assert p.first_divergent_layer == "layer 1", p
        assert p.hidden_rel[0] < 1e-6 and p.hidden_rel[1] < 1e-6  # embeddings and layer 0 agree
        assert any("layer 1" in f for f in p.failures)
    text = format_table(report)
    assert "FAIL" in text and "layer 1" in text and text.rstrip().splitlines()[-1].startswith("FAILED")


def test_missing_backend_is_reported_and_fails(monkeypatch, tiny_ckpt):
    monkeypatch.setattr(engine, "backend_available", lambda name: f"package opt_{name} is not installed")
    report = verify(tiny_ckpt, backends=("flax",), new_tokens=2)
    assert not report.passed
    flax = [b for b in report.backends if b.name == "flax"][0]
    assert flax.status == "missing" and "opt_flax" in flax.message
    assert "MISSING" in format_table(report)
    relaxed = verify(tiny_ckpt, backends=("flax",), new_tokens=2, allow_missing=True)
    assert not relaxed.passed  # still nothing to compare the reference with
    assert any("nothing to compare" in e for e in relaxed.errors)


def test_backend_error_is_reported(fake_backends, monkeypatch, tiny_ckpt):
    def broken(*a, **k):
        raise RuntimeError("boom in the loader")

    monkeypatch.setattr(engine, "_BackendAdapter", broken)
    report = verify(tiny_ckpt, backends=("torch",), new_tokens=2)
    assert not report.passed
    torch = [b for b in report.backends if b.name == "torch"][0]
    assert torch.status == "error" and "boom in the loader" in torch.message


def test_size_guard_leaves_reference_out(fake_backends, tiny_ckpt):
    report = verify(tiny_ckpt, backends=("torch", "flax"), new_tokens=2, reference_max_params=1000)
    ref = report.backends[0]
    assert ref.name == "reference" and ref.status == "skipped" and "size guard" in ref.message
    assert [(p.a, p.b) for p in report.pairs] == [("torch", "flax")]
    assert report.passed, format_table(report)
    forced = verify(tiny_ckpt, backends=("torch",), new_tokens=2, reference_max_params=1000, reference=True)
    assert forced.backends[0].status == "ok"


def test_given_ids_are_left_padded(fake_backends, tiny_ckpt):
    report = verify(tiny_ckpt, backends=("torch",), input_ids=[[2, 5, 6, 7], [2, 9]], new_tokens=3)
    assert report.passed and report.input_source == "input_ids"
    assert report.input_ids == [[2, 5, 6, 7], [1, 1, 2, 9]]
    assert report.attention_mask == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_prompts_use_the_tokenizer(fake_backends, tmp_path, tokenizer_dir):
    # real vocabulary size so the tokenizer's ids fit; everything else tiny
    cfg = OPTConfig(vocab_size=50272, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=8, do_layer_norm_before=False)
    folder = write_checkpoint(tmp_path / "m", cfg)
    report = verify(folder, backends=("torch",), prompts=["Hello, my dog is cute", "Hi"], new_tokens=2,
                    tokenizer_dir=tokenizer_dir)
    assert report.passed, format_table(report)
    assert report.input_ids[0] == [2, 31414, 6, 127, 2335, 16, 11962]
    assert report.input_ids[1][-2] == 2 and report.input_ids[1][0] == 1  # left-padded with <pad>


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backends=("torch", "jax")), "unknown backend"),
        (dict(dtype="float8"), "unknown dtype"),
        (dict(prompts=["hi"]), "need a tokenizer"),
        (dict(input_ids=[[2, 500]]), "outside the model's vocabulary"),
        (dict(new_tokens=100), "max_position_embeddings"),
    ],
)
def test_bad_input(tiny_ckpt, kwargs, message):
    with pytest.raises(VerifyError, match=message):
        verify(tiny_ckpt, **kwargs)


def test_missing_folder(tmp_path):
    with pytest.raises(VerifyError, match="does not exist"):
        verify(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VerifyError, match="no config.json"):
        verify(tmp_path / "empty")


class _Scripted:
    """A model whose last-position logits are fixed: tokens 5 and 6 nearly tied (or not)."""

    def __init__(self, gap):
        self.gap = gap

    def forward(self, ids, mask):
        logits = np.zeros((ids.shape[0], ids.shape[1], 10))
        logits[..., 5] = 10.0
        logits[..., 6] = 10.0 - self.gap
        return logits, []


@pytest.mark.parametrize("gap, tie", [(1e-6, True), (1.0, False)])
def test_greedy_near_tie(gap, tie):
    ids = np.array([[2, 7, 8]])
    mask = np.ones_like(ids)
    a = engine._Run(_Scripted(gap), np.zeros((1, 3, 10)), [], np.array([[2, 7, 8, 4, 5, 5]]))
    b = engine._Run(_Scripted(gap), np.zeros((1, 3, 10)), [], np.array([[2, 7, 8, 4, 6, 6]]))
    pair = engine.compare("reference", "torch", a, b, ids, mask, 1e-5, eos=2)
    assert pair.greedy_first_divergence == {"row": 0, "position": 1}
    assert pair.greedy_matched == 1 and pair.greedy_compared == 2
    assert pair.greedy_near_tie is tie and pair.passed is tie


def test_greedy_stops_comparing_after_shared_eos():
    ids = np.array([[2, 7], [2, 8]])
    mask = np.ones_like(ids)
    logits = np.zeros((2, 2, 10))
    a = engine._Run(None, logits, [], np.array([[2, 7, 4, 2, 9], [2, 8, 5, 5, 5]]))
    b = engine._Run(None, logits, [], np.array([[2, 7, 4, 2, 1], [2, 8, 5, 5, 5]]))  # b pads after eos
    pair = engine.compare("reference", "torch", a, b, ids, mask, 1e-5, eos=2)
    assert pair.passed and pair.greedy_matched == pair.greedy_compared == 2 + 3


def test_reports_written(fake_backends, tiny_ckpt, tmp_path):
    report = verify(tiny_ckpt, backends=("torch", "flax"), new_tokens=4)
    data = json.loads(write_json(report, tmp_path / "r.json").read_text())
    assert data["passed"] is True and data["dtype"] == "float32"
    assert {(p["a"], p["b"]) for p in data["pairs"]} == {("reference", "torch"), ("reference", "flax"),
                                                          ("torch", "flax")}
    assert data["pairs"][0]["hidden_labels"] == ["embeddings", "layer 0", "layer 1"]
    md = write_markdown(report, tmp_path / "r.md").read_text()
    assert md.startswith("# opt verify: PASSED")
    assert "| reference vs torch |" in md and "Hidden-state relative error per layer" in md
    assert to_markdown(report) == md


def test_assert_equivalent(fake_backends, tiny_ckpt, tmp_path):
    assert assert_equivalent(tiny_ckpt, backends=("torch",), new_tokens=2).passed
    bad = corrupt_copy(tiny_ckpt, tmp_path / "bad", "model.decoder.layers.0.self_attn.v_proj.weight")
    fake_backends["torch"] = bad
    with pytest.raises(EquivalenceError, match="layer 0") as info:
        assert_equivalent(tiny_ckpt, backends=("torch",), new_tokens=2)
    assert isinstance(info.value, AssertionError) and not info.value.report.passed


# ---------------------------------------------------------------- the command line
def test_cli_pass_writes_reports(fake_backends, tiny_ckpt, tmp_path, capsys):
    rc = opt_main(["verify", str(tiny_ckpt), "--backends", "torch,tf", "--new-tokens", "4",
                   "--json", str(tmp_path / "o.json"), "--markdown", str(tmp_path / "o.md")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reference vs torch" in out and "PASSED" in out
    assert json.loads((tmp_path / "o.json").read_text())["passed"] is True
    assert (tmp_path / "o.md").read_text().startswith("# opt verify: PASSED")


def test_cli_failure_exit_code(fake_backends, tiny_ckpt, tmp_path, capsys):
    fake_backends["flax"] = corrupt_copy(tiny_ckpt, tmp_path / "bad", "model.decoder.layers.1.fc2.weight")
    rc = opt_main(["verify", str(tiny_ckpt), "--backends", "flax", "--new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" in out and "layer 1" in out


def test_cli_prompts_file(fake_backends, tiny_ckpt, tmp_path, capsys):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text("[[2, 10, 11], [2, 12]]")
    assert opt_main(["verify", str(tiny_ckpt), "--backends", "torch", "--prompts", str(ids_file),
                     "--new-tokens", "2"]) == 0
    assert "(input_ids)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "{tmp}/nope"], "does not exist"),
        (["verify", "{ckpt}", "--backends", "torch,mxnet"], "unknown backend(s) mxnet"),
        (["verify", "{ckpt}", "--prompts", "{tmp}/none.txt"], "prompts file"),
        (["verify", "{ckpt}", "--prompts", "{tmp}/p.txt"], "need a tokenizer"),
    ],
)
def test_cli_bad_input_exit_2(tiny_ckpt, tmp_path, capsys, argv, message):
    (tmp_path / "p.txt").write_text("Hello\n")
    argv = [a.format(tmp=tmp_path, ckpt=tiny_ckpt) for a in argv]
    assert opt_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("opt verify: ") and message in err and "Traceback" not in err


# ---------------------------------------------------------------- the pytest plugin, in a user's suite
USER_CONFTEST = '''
import importlib
import sys
sys.path.insert(0, {root!r})
from tests.verify.conftest import FakeBackend
pytest_plugins = ["opt_verify.pytest_plugin"]
engine = importlib.import_module("opt_verify.verify")
engine._BackendAdapter = FakeBackend
engine.backend_available = lambda name: None
FakeBackend.folders = {{"flax": {bad!r}}}  # flax reads a corrupted copy
'''


def test_pytest_plugin_in_a_user_suite(tiny_ckpt, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    bad = corrupt_copy(tiny_ckpt, tmp_path / "bad", "model.decoder.layers.0.fc1.weight")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(USER_CONFTEST.format(root=root, bad=str(bad)))
    (suite / "test_user.py").write_text(
        "def test_fixture(opt_equivalence):\n"
        f"    opt_equivalence({str(tiny_ckpt)!r}, backends=('torch', 'tf'), new_tokens=2)\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite),
           "--opt-verify-model", str(tiny_ckpt), "--opt-verify-backends", "torch,flax",
           "--rootdir", str(suite)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=suite, timeout=300)
    out = proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in out, out
    assert "opt-verify[" in out and "layer 0" in out and "FAILED in" in out, out


@pytest.mark.parametrize("decides", [True, False])
def test_hidden_states_decide_only_in_full_precision(decides):
    ids = np.array([[2, 7, 8]])
    mask = np.ones_like(ids)
    logits = np.random.default_rng(0).standard_normal((1, 3, 10))
    h = [np.ones((1, 3, 4)), np.ones((1, 3, 4))]
    off = [np.ones((1, 3, 4)), np.full((1, 3, 4), 1.1)]
    tokens = np.array([[2, 7, 8, 4]])
    a = engine._Run(None, logits, h, tokens)
    b = engine._Run(None, logits, off, tokens)
    pair = engine.compare("reference", "torch", a, b, ids, mask, 4e-2, eos=2, hidden_decides=decides)
    assert pair.first_divergent_layer == "layer 0"
    assert pair.passed is not decides
    assert bool(pair.notes) is not decides and bool(pair.failures) is decides
    assert engine.HIDDEN_STATES_DECIDE == ("float64", "float32")
