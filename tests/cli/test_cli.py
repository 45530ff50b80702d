"""The `opt` commands: clear one-paragraph errors (exit 2, no traceback) for bad input, and the
generate / eval-ppl / info / train / demo commands on a tiny model folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from opt_cli.commands_eval import windows
from opt_cli.main import main

pytestmark = pytest.mark.torch


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--backend", "jax", "--prompt", "hi"], "unknown backend 'jax'"),
        (["generate", "--model", "/no/such/folder", "--prompt", "hi"], "does not exist"),
        (["generate", "--prompt", "   "], "the prompt is empty"),
        (["generate", "--prompt", "hi", "--do-sample", "--temperature", "0"],
         "argument --temperature: must be > 0.0, got 0"),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: must be <= 1.0, got 1.5"),
        (["generate", "--prompt", "hi", "--top-k", "-1"], "argument --top-k: must be an integer >= 0, got -1"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"],
         "argument --max-new-tokens: must be an integer >= 1, got 0"),
        (["eval-ppl", "--text", "/no/such.txt"], "/no/such.txt does not exist"),
        (["eval-ppl", "--text", "README.md", "--backend", "mxnet"], "unknown backend 'mxnet'"),
        (["info", "/no/such/folder"], "does not exist"),
        (["train", "--corpus", "/no/such.txt", "--out", "x"], "/no/such.txt does not exist"),
        (["demo", "--backends", "torch,paddle"], "unknown backend(s) paddle"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert err.startswith(f"opt {argv[0]}: ")


def test_folder_problems(capsys, tiny_model_dir, tmp_path):
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_tok)
    code, _, err = run_cli(capsys, "generate", "--model", no_tok, "--prompt", "hi")
    assert code == 2 and "tokenizer files missing" in err and "vocab.json, merges.txt" in err
    code, _, err = run_cli(capsys, "info", tmp_path)
    assert code == 2 and "holds no config.json" in err
    long_prompt = "ROMEO: but soft " * 40
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", long_prompt)
    assert code == 2 and "context is 48 tokens" in err
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "ROMEO:",
                           "--max-new-tokens", "60")
    assert code == 2 and "exceeds the model's context of 48" in err


# ---------------------------------------------------------------- commands
def test_generate_greedy_stream_matches_and_sampling_is_seeded(capsys, tiny_model_dir):
    base = ["generate", "--model", tiny_model_dir, "--prompt", "ROMEO:", "--max-new-tokens", "12"]
    code, plain, err = run_cli(capsys, *base)
    assert code == 0 and "tokens/s" in err
    code, streamed, _ = run_cli(capsys, *base, "--stream")
    assert code == 0 and streamed == plain
    a = run_cli(capsys, *base, "--do-sample", "--seed", "3", "--top-p", "0.9")[1]
    b = run_cli(capsys, *base, "--do-sample", "--seed", "3", "--top-p", "0.9")[1]
    assert a == b


def test_info(capsys, tiny_model_dir):
    from opt_core import OPTConfig, parameter_count

    code, out, _ = run_cli(capsys, "info", tiny_model_dir)
    n = parameter_count(OPTConfig.from_pretrained(tiny_model_dir))
    assert code == 0 and f"{n:,}" in out and "safetensors" in out and "F32" in out and "size on disk" in out
    code, out, _ = run_cli(capsys, "info", tiny_model_dir, "--json")
    info = json.loads(out)
    assert info["parameters"] == n and info["formats"] == ["safetensors"] and info["size_bytes"] > 0


def test_eval_ppl_windows_and_token_count(capsys, tiny_model_dir):
    assert windows(10, 4, 4) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    assert windows(10, 4, 2) == [(0, 4, 0), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    code, out, _ = run_cli(capsys, "eval-ppl", "--model", tiny_model_dir, "--text", tiny_model_dir / "text.txt",
                           "--max-tokens", "200", "--no-progress")
    assert code == 0
    # 200 tokens in windows of 48 (the context): 5 windows, the first token of each unscored.
    assert "over 195 predicted tokens; 5 windows of 48, stride 48" in out
    ppl = float(out.split()[1])
    assert 1 < ppl < 2 * 300  # a random model: about the vocabulary size
    code, out, _ = run_cli(capsys, "eval-ppl", "--model", tiny_model_dir, "--text", tiny_model_dir / "text.txt",
                           "--max-tokens", "200", "--stride", "24", "--no-progress")
    assert code == 0 and "over 199 predicted tokens" in out
    code, _, err = run_cli(capsys, "eval-ppl", "--model", tiny_model_dir, "--text", tiny_model_dir / "text.txt",
                           "--stride", "100")
    assert code == 2 and "--stride must be between 1 and the window (48)" in err


def test_eval_ppl_matches_a_direct_computation(tiny_model_dir):
    import torch

    from opt_cli.commands_eval import perplexity_of_ids
    from opt_torch import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = np.arange(4, 104) % 300
    res = perplexity_of_ids("torch", model, ids, window=48, stride=48, progress=False)
    nll = []
    for begin in range(0, 100, 48):
        chunk = torch.as_tensor(ids[None, begin : begin + 48])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].double(), -1)
        nll += (-logp[torch.arange(chunk.shape[1] - 1), chunk[0, 1:]]).tolist()
    assert res["tokens"] == len(nll) == 97
    assert res["nll"] == pytest.approx(np.mean(nll), rel=1e-5)


def test_train_command_end_to_end(capsys, tiny_model_dir, tmp_path):
    out_dir = tmp_path / "trained"
    code, out, err = run_cli(
        capsys, "train", "--corpus", tiny_model_dir / "text.txt", "--out", out_dir, "--vocab-size", "300",
        "--hidden-size", "32", "--layers", "1", "--heads", "2", "--ffn-dim", "64", "--context", "32",
        "--steps", "6", "--batch-size", "4", "--warmup", "2", "--eval-every", "3", "--log-every", "3",
    )
    assert code == 0, err
    assert "validation perplexity" in out
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "generation_config.json", "training_args.json", "trainer_log.json", "training_summary.json"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["arguments"]["steps"] == 6
    code, out, _ = run_cli(capsys, "generate", "--model", out_dir, "--prompt", "ROMEO:", "--max-new-tokens", "5")
    assert code == 0
    # fine-tuning an existing folder keeps its tokenizer and shape
    tuned = tmp_path / "tuned"
    code, out, err = run_cli(capsys, "train", "--corpus", tiny_model_dir / "text.txt", "--init", out_dir,
                             "--out", tuned, "--steps", "2", "--batch-size", "4", "--warmup", "1")
    assert code == 0, err
    assert (tuned / "vocab.json").read_text() == (out_dir / "vocab.json").read_text()


def test_demo_on_one_backend(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "demo", "--model", tiny_model_dir, "--backends", "torch",
                           "--max-new-tokens", "8", "--prompt", "ROMEO:")
    assert code == 0
    assert "[torch]" in out and "tokens/s" in out and "greedy texts agree" in out


def test_stream_wiring_is_generic_over_backends():
    """`opt generate --stream` hands the same HF-style streamer (put/end) to any backend's generate and
    falls back to printing at the end for a generate that takes no streamer."""
    from opt_cli.backends import Adapter
    from opt_cli.commands_generate import generate_streaming
    from opt_cli.streaming import TextStreamer

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    class Streams:
        def generate(self, ids, attention_mask=None, streamer=None, max_new_tokens=3):
            streamer.put(ids)
            for t in range(max_new_tokens):
                streamer.put(np.array([t]))
            streamer.end()
            return np.concatenate([ids, np.arange(max_new_tokens)[None]], axis=1)

    class NoStreamer:
        def generate(self, ids, attention_mask=None, max_new_tokens=3):
            return np.concatenate([ids, np.arange(max_new_tokens)[None]], axis=1)

    import io

    ids = np.array([[2, 7]])
    for model, streams in ((Streams(), True), (NoStreamer(), False)):
        out = io.StringIO()
        streamer = TextStreamer(Tok(), eos_token_id=None, out=out)
        tokens, streamed = generate_streaming(Adapter(), model, ids, streamer, max_new_tokens=3)
        assert streamed is streams and tokens.tolist() == [[2, 7, 0, 1, 2]]
        assert out.getvalue() == ("abc\n" if streams else "")
        if streams:
            n, rate = streamer.decode_rate() or (0, 0.0)
            assert n == 2 and rate > 0
