"""Tensor parallelism over 2 local gloo processes (torchrun) against one process, on tiny models."""

from __future__ import annotations

import pytest
import torch

from opt_core import Head, OPTConfig
from opt_torch.modeling import MODEL_CLASSES
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.torch

# Heads, ffn and vocab divisible by 2; post-LN with projections (350m-like) and an untied lm_head
# beside the pre-LN tied default.
CONFIGS = {
    "pre_ln": OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=64),
    "post_ln_proj_untied": OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=False,
                                     word_embed_proj_dim=16, tie_word_embeddings=False),
}


def save(tmp_path, name: str, config: OPTConfig, head: Head) -> str:
    torch.manual_seed(0)
    model = MODEL_CLASSES[head](config)
    if head is not Head.CAUSAL_LM:  # nonzero head biases, so a dropped bias would show
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05) if p.dim() == 1 else None
    folder = tmp_path / f"{name}-{head.value}"
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    runs = [("pre_ln", h) for h in Head if h is not Head.BASE] + [("post_ln_proj_untied", Head.CAUSAL_LM)]
    args = [f"{v}/{h.value}={h.value}:{save(tmp, v, CONFIGS[v], h)}" for v, h in runs]
    results, _ = torchrun("tp_check.py", args)  # one launch: starting processes dominates the time
    return results


@pytest.mark.parametrize("variant,head", [("pre_ln", "causal_lm"), ("pre_ln", "sequence_classification"),
                                          ("pre_ln", "question_answering"), ("post_ln_proj_untied", "causal_lm")])
def test_tp_matches_one_process(tp_results, variant, head):
    r = tp_results[f"{variant}/{head}"]
    assert r["shape_equal"] and r["same_on_all_ranks"], r
    assert r["rel_err"] < 1e-5, r
    # Each rank holds about half: exactly the table's prediction, and well under the whole model.
    assert r["local_bytes_per_rank"] == [r["predicted_bytes"]] * 2, r
    assert r["local_bytes"] < 0.6 * r["full_bytes"], r


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj_untied"])
def test_tp_generate_matches_one_process(tp_results, variant):
    r = tp_results[f"{variant}/causal_lm"]
    assert all(r["tokens_equal"].values()), r["tokens_equal"]
    assert r["tokens_same_on_all_ranks"] and r["unseeded_sample_same_on_all_ranks"], r
