"""`opt train --lora-r ...` writes a PEFT adapter folder; `opt generate --adapter DIR` applies it."""

from __future__ import annotations

from pathlib import Path

import pytest

from opt_cli.main import main

TEXT = "".join(f"ROMEO:\nline {i}: but soft, what light through yonder window breaks?\n\n" for i in range(80))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    import torch

    from opt_core import OPTConfig
    from opt_core.data import train_tokenizer
    from opt_torch import OPTForCausalLM

    folder = tmp_path_factory.mktemp("lora-cli-base")
    tok = train_tokenizer(TEXT, vocab_size=300)
    config = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=48)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    return folder


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.torch
def test_train_writes_an_adapter_that_generate_applies(capsys, base_dir, tmp_path):
    from opt_core.lora import LoraConfig
    from opt_torch import OPTForCausalLM
    from opt_torch.lora import adapter_weights, load_adapter

    out_dir = tmp_path / "adapter"
    code, out, err = run_cli(capsys, "train", "--corpus", base_dir / "text.txt", "--init", base_dir, "--out", out_dir,
                             "--lora-r", "4", "--lora-targets", "q_proj,fc1", "--steps", "4", "--batch-size", "4",
                             "--warmup", "1", "--lr", "1e-2", "--block-size", "32")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [  # the adapter, not a copy of the base
        ".opt-manifest.json", "adapter_config.json", "adapter_model.safetensors", "training_summary.json"]
    config = LoraConfig.from_pretrained(out_dir)
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, ("q_proj", "fc1"))
    model = load_adapter(OPTForCausalLM.from_pretrained(base_dir), out_dir)
    assert all(abs(b).max() > 0 for _, b in adapter_weights(model).values())  # it trained
    code, out, err = run_cli(capsys, "generate", "--model", base_dir, "--adapter", out_dir, "--prompt", "ROMEO:",
                             "--max-new-tokens", "4")
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    (["--lora-r", "4"], "--lora-r adapts an existing model: pass --init"),
    (["--lora-r", "4", "--init", "BASE", "--lora-targets", "q_proj,gate_proj"], "'gate_proj' is not an OPT linear"),
    (["--lora-r", "4", "--init", "BASE", "--save-every", "2"], "does not combine with --fsdp or --save-every"),
])
def test_bad_lora_arguments_are_one_line(capsys, base_dir, tmp_path, argv, message):
    argv = [str(base_dir) if a == "BASE" else a for a in argv]
    code, _, err = run_cli(capsys, "train", "--corpus", base_dir / "text.txt", "--out", tmp_path / "o", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_generate_with_a_missing_adapter_is_one_line(capsys, base_dir, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", base_dir, "--adapter", tmp_path / "nope", "--prompt", "hi",
                           "--max-new-tokens", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "adapter_config.json" in err, err


@pytest.mark.torch
@pytest.mark.tf
@pytest.mark.flax
def test_verify_compares_the_backends_with_the_adapter_applied(capsys, base_dir, tmp_path):
    """Each backend runs its own LoRA layers; the float64 reference has the adapter merged in
    (`opt_core.lora.merge_into_parameters`): two independent routes that must agree."""
    import json

    import numpy as np

    from opt_core.lora import LoraConfig, init_adapter, linear_shapes, save_adapter_files

    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "fc1", "fc2"))
    rng = np.random.default_rng(0)
    start = init_adapter(config, 2, linear_shapes(32, 64), seed=0)
    save_adapter_files(tmp_path / "a", config, {k: (a, rng.normal(0, 0.3, b.shape).astype(np.float32))
                                                for k, (a, b) in start.items()})
    (tmp_path / "prompts.txt").write_text("ROMEO:\nbut soft, what light\n")
    reports = {}
    for name, extra in (("with", ["--adapter", tmp_path / "a"]), ("without", [])):
        code, out, err = run_cli(capsys, "verify", base_dir, "--new-tokens", "4", "--quiet-progress",
                                 "--prompts", tmp_path / "prompts.txt", "--json", tmp_path / f"{name}.json", *extra)
        assert code == 0, out + err
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for report in reports.values():
        assert report["passed"] and len(report["pairs"]) == 6  # reference, torch, tf, flax: every pair
        assert [b["status"] for b in report["backends"]] == ["ok"] * 4
    code, _, err = run_cli(capsys, "verify", base_dir, "--adapter", tmp_path / "missing")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "adapter_config.json" in err, err


@pytest.mark.torch
@pytest.mark.flax
def test_convert_merges_an_adapter_into_the_converted_checkpoint(capsys, base_dir, tmp_path):
    import numpy as np
    import torch

    from opt_core.lora import LoraConfig, init_adapter, linear_shapes, save_adapter_files
    from opt_flax import OPTForCausalLM as FlaxLM
    from opt_torch import OPTForCausalLM
    from opt_torch.lora import load_adapter
    from tests.variants import relative_error

    config = LoraConfig(r=4, lora_alpha=8, target_modules=("v_proj", "out_proj", "fc2"), use_rslora=True)
    rng = np.random.default_rng(2)
    start = init_adapter(config, 2, linear_shapes(32, 64), seed=5)
    save_adapter_files(tmp_path / "a", config, {k: (a, rng.normal(0, 0.3, b.shape).astype(np.float32))
                                                for k, (a, b) in start.items()})
    code, out, err = run_cli(capsys, "convert", base_dir, tmp_path / "merged", "--to", "flax-msgpack",
                             "--merge-adapter", tmp_path / "a", "--no-progress")
    assert code == 0, err
    ids = np.array([[2, 40, 41, 42, 43, 44, 45]])
    merged = np.asarray(FlaxLM.from_pretrained(tmp_path / "merged")(ids).logits)
    with torch.no_grad():
        want = load_adapter(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "a")(torch.tensor(ids)).logits.numpy()
        base = OPTForCausalLM.from_pretrained(base_dir)(torch.tensor(ids)).logits.numpy()
    assert relative_error(base, want) > 1e-3  # the adapter matters
    assert relative_error(merged, want) <= 1e-5
    code, _, err = run_cli(capsys, "convert", base_dir, tmp_path / "v", "--to", "safetensors",
                           "--merge-adapter", tmp_path / "a", "--verify")
    assert code == 2 and "opt verify" in err and len(err.strip().splitlines()) == 1, err
