"""Run under torchrun (tests/distributed/test_torch_fsdp.py): FSDP2 training of a tiny causal LM,
then a resumed run from its sharded checkpoint. Arguments: OUT_DIR. Rank 0 prints one JSON line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from opt_torch.parallel import local_parameter_bytes
from opt_torch.training import train_causal_lm
from tests.distributed.test_torch_fsdp import args, make_model, training_blocks


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = make_model()
    start = time.perf_counter()
    train_causal_lm(model, training_blocks(), args(output_dir=str(out / "fsdp")), log=None, fsdp=True)
    seconds = time.perf_counter() - start
    local = local_parameter_bytes(model)
    # Resume from the step-2 checkpoint into a fresh (differently initialised) model.
    resumed = make_model(seed=1)
    train_causal_lm(resumed, training_blocks(), args(output_dir=str(out / "resumed")), log=None, fsdp=True,
                    resume_from=out / "fsdp" / "checkpoint-2")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    if dist.get_rank() == 0:
        print(json.dumps({"local_bytes_per_rank": everyone, "train_seconds": seconds}))
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
