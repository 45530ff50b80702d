"""A tiny trained-tokenizer model folder for the CLI tests (torch-written, HF layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXT = "".join(
    f"ROMEO:\nline {i}: but soft, what light through yonder window breaks? it is the east.\n\n"
    for i in range(120)
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch

    from opt_core import OPTConfig
    from opt_core.data import train_tokenizer
    from opt_torch import OPTForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = train_tokenizer(TEXT, vocab_size=300)
    config = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=48)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    return folder
