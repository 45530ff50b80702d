"""Every backend's `generate` refuses what would be silently wrong or unbounded with the resolver's
own words (an out-of-vocabulary pad id, too many beams, a temperature that overflows float32), and
gives Hugging Face's warning for right-padded prompts. All of it happens before any compilation, so
the XLA backends stay fast here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from opt_core import OPTConfig, resolve_generation_options
from opt_core.inputs import RIGHT_PADDING_WARNING

CONFIG = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=48, word_embed_proj_dim=16)
IDS = np.array([[2, 40, 41, 40], [2, 50, 51, 1]])
LEFT = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
RIGHT = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])


@pytest.fixture(scope="module")
def model(backend):
    return backend.build(CONFIG)


@pytest.mark.parametrize("kw, message", [
    (dict(pad_token_id=96), r"^pad_token_id 96 is outside the vocabulary \[0, 96\)"),
    (dict(pad_token_id=10**9), r"^pad_token_id 1000000000 is outside the vocabulary"),
    (dict(num_beams=10**6), r"^num_beams must be an integer in \[1, 256\] \(the limit MAX_NUM_BEAMS"),
    (dict(do_sample=True, temperature=1e-40, seed=0), r"^temperature must be in \[1e-06, 1e\+06\]"),
    (dict(repetition_penalty=1e30), r"^repetition_penalty must be in \[1e-06, 1e\+06\]"),
], ids=lambda v: ",".join(v) if isinstance(v, dict) else "")
def test_refused_in_every_backend_with_one_text(backend, model, kw, message):
    with pytest.raises(ValueError, match=message) as core:
        resolve_generation_options(CONFIG, model.generation_config, prompt_length=IDS.shape[1], **kw)
    with pytest.raises(ValueError) as ours:
        model.generate(IDS, attention_mask=LEFT, max_new_tokens=2, **kw)
    assert str(ours.value) == str(core.value)


def test_right_padding_warns_in_every_backend(backend, model):
    with pytest.warns(UserWarning) as record:
        backend.to_numpy(model.generate(IDS, attention_mask=RIGHT, max_new_tokens=0))
    assert RIGHT_PADDING_WARNING in [str(w.message) for w in record]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*right-padding")
        backend.to_numpy(model.generate(IDS[:, ::-1][:, :3].copy(), attention_mask=LEFT[:, :3], max_new_tokens=0))
