"""Run under torchrun (tests/distributed/test_torch_tp.py): load each folder once per process and once
tensor-parallel over all ranks, then compare. Rank 0 prints one JSON line.

Arguments: NAME=HEAD:FOLDER ... (HEAD one of causal_lm, sequence_classification, question_answering)
[--replicated-vocab] [--time N] (N timed forward passes of each model).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from opt_core import Head
from opt_torch.modeling import MODEL_CLASSES
from opt_torch.parallel import local_parameter_bytes, per_rank_parameter_bytes
from tests.variants import left_padded_batch, relative_error

OUTPUTS = {Head.CAUSAL_LM: "logits", Head.SEQUENCE_CLASSIFICATION: "logits", Head.QUESTION_ANSWERING: "start_logits"}


def same_everywhere(x) -> bool:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, x)
    return all(e == everyone[0] for e in everyone)


def generations(model, ids, mask) -> dict[str, list]:
    runs = {
        "greedy": dict(max_new_tokens=6, do_sample=False, eos_token_id=[]),
        "beam": dict(max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=[]),
        "sample_seed": dict(max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, seed=7, eos_token_id=[]),
    }
    return {k: model.generate(ids, attention_mask=mask, **kw).tolist() for k, kw in runs.items()}


def main() -> None:
    args = sys.argv[1:]
    vocab_parallel = "--replicated-vocab" not in args
    timed = int(args[args.index("--time") + 1]) if "--time" in args else 0
    folders = [a.split("=", 1) for a in args if "=" in a]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for name, spec in folders:
        head_name, folder = spec.split(":", 1)
        head = Head(head_name)
        cls = MODEL_CLASSES[head]
        one = cls.from_pretrained(folder)
        if vocab_parallel:
            tp = cls.from_pretrained(folder, tp_plan="auto")
        else:  # the measured alternative: embeddings and lm_head replicated
            from opt_torch.io import resolve_dtype
            from opt_torch.parallel import from_pretrained_tp

            tp = from_pretrained_tp(cls, folder, one.config, resolve_dtype(None), vocab_parallel=False)
            tp.generation_config = one.generation_config  # what from_pretrained adds around the loader
        ids, mask = left_padded_batch(one.config.vocab_size)
        with torch.no_grad():
            ref = getattr(one(input_ids=ids, attention_mask=mask), OUTPUTS[head]).numpy()
            got = getattr(tp(input_ids=ids, attention_mask=mask), OUTPUTS[head]).numpy()
        cmp_mask = None if head is Head.SEQUENCE_CLASSIFICATION else mask
        r = {
            "rel_err": relative_error(got, ref, cmp_mask),
            "shape_equal": got.shape == ref.shape,
            "same_on_all_ranks": same_everywhere(got.round(5).tolist()),
            "local_bytes": local_parameter_bytes(tp),
            "full_bytes": local_parameter_bytes(one),
            "predicted_bytes": per_rank_parameter_bytes(one.config, dist.get_world_size(), 4, head, vocab_parallel),
        }
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, r["local_bytes"])
        r["local_bytes_per_rank"] = everyone
        if head is Head.CAUSAL_LM:
            want, have = generations(one, ids, mask), generations(tp, ids, mask)
            r["tokens_equal"] = {k: want[k] == have[k] for k in want}
            r["tokens_same_on_all_ranks"] = same_everywhere(have)
            unseeded = tp.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, eos_token_id=[])
            r["unseeded_sample_same_on_all_ranks"] = same_everywhere(unseeded.tolist())
        if timed:
            ids_t = np.random.default_rng(0).integers(4, one.config.vocab_size, (4, 32))
            for label, model in (("one", one), ("tp", tp)):
                with torch.no_grad():
                    model(input_ids=ids_t)
                    dist.barrier()
                    start = time.perf_counter()
                    for _ in range(timed):
                        model(input_ids=ids_t)
                    r[f"forward_ms_{label}"] = 1e3 * (time.perf_counter() - start) / timed
        results[name] = r
    if dist.get_rank() == 0:
        print(json.dumps(results))
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
