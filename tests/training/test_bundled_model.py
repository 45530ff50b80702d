"""The bundled opt-shakespeare model: shipped complete and small, loaded unchanged by Hugging Face
transformers 4.57.6 with the same greedy text, and the same greedy text in all three backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opt_core import OPTConfig, OPTTokenizer, bundled, parameter_count
from tests.variants import TOLERANCE, relative_error

PROMPTS = ["ROMEO:\nWhat light", "First Citizen:\nWe are accounted poor citizens"]
FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
         "generation_config.json", "README.md")


def _batch():
    tok = OPTTokenizer.from_pretrained(bundled.path())
    enc = tok(PROMPTS, padding=True, padding_side="left")
    return tok, enc["input_ids"], enc["attention_mask"]


def test_bundled_folder_is_complete_and_small():
    folder = bundled.path()
    for name in FILES:
        assert (folder / name).is_file(), name
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= 20 * 1024 * 1024, f"{size / 2**20:.1f} MB"
    config = OPTConfig.from_pretrained(folder)
    tok = OPTTokenizer.from_pretrained(folder)
    assert config.vocab_size == len(tok)
    assert 2e6 < parameter_count(config) < 10e6
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.encode("ROMEO:")[0] == 2
    card = (folder / "README.md").read_text()
    summary = json.loads((folder / "training_summary.json").read_text())
    assert f"{summary['validation']['perplexity']:.2f}" in card
    assert "scripts/train_bundled.sh" in card


@pytest.mark.oracle
def test_hugging_face_tokenizer_agrees():
    from tests.oracle import oracle_tokenize

    tok = OPTTokenizer.from_pretrained(bundled.path())
    texts = [*PROMPTS, "  O, she doth teach the torches to burn bright! </s> é"]
    assert oracle_tokenize(bundled.path(), texts) == [tok.encode(t) for t in texts]


@pytest.mark.oracle
@pytest.mark.torch
def test_hugging_face_loads_it_unchanged_with_the_same_greedy_text():
    import torch

    from opt_torch import OPTForCausalLM
    from tests.oracle import oracle_run

    tok, ids, mask = _batch()
    hf = oracle_run(bundled.path(), [{"framework": "torch", "input_ids": ids, "attention_mask": mask,
                                      "generate": {"max_new_tokens": 24, "do_sample": False}}])[0]
    model = OPTForCausalLM.from_pretrained(bundled.path()).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert relative_error(logits, hf["logits"], mask) <= TOLERANCE["float32"]
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, hf["sequences"])
    texts = tok.batch_decode(ours[:, ids.shape[1]:], skip_special_tokens=True)
    assert all(t.strip() for t in texts), texts


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.tf
@pytest.mark.flax
def test_demo_greedy_texts_agree_in_three_backends(capsys):
    from opt_cli.main import main

    assert main(["demo", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "greedy texts agree" in out and all(f"[{b}]" in out for b in ("torch", "tf", "flax"))
