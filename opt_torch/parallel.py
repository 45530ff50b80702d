"""Tensor parallelism for the PyTorch models: a Megatron plan applied with
`torch.distributed.tensor.parallel` beside the unchanged model, and a loader in which every rank
reads only its own slices of the safetensors files.

    # torchrun --nproc-per-node 2 run.py   (gloo on CPU, NCCL on GPU)
    model = OPTForCausalLM.from_pretrained(folder, tp_plan="auto")   # or device_mesh=a 1-D mesh
    model(input_ids=ids).logits                    # the full [B, T, V] on every rank
    model.generate(ids, max_new_tokens=20)         # the same tokens on every rank

The plan, in canonical module names (`TENSOR_PARALLEL_PLAN`):
- q/k/v_proj and fc1 are column-wise: weight [out, in] split on `out`, bias split. A rank holds
  H/N whole heads, so attention (and its KV cache) runs on local heads without communication.
- out_proj and fc2 are row-wise: weight split on `in`, bias replicated (added once, after the
  all-reduce). One all-reduce per block: two per layer.
- the token embedding is vocab-parallel (rows split: a rank looks up the ids it holds, zeros for the
  rest, one all-reduce) and lm_head is column-wise over the vocabulary with the logits all-gathered,
  so every rank holds full logits. Both split [V, E] on dim 0, so a tied lm_head stays one tensor.
- positions, LayerNorms, project_in/out, score and qa_outputs are replicated (small).

Vocab-parallel rather than replicated embeddings, measured: on the bundled 4.3M-parameter model
over 2 gloo ranks (tests/distributed/tp_check.py --time 20, a [4, 32] forward) the two cost the same
within this shared machine's noise (150-178 ms vs 161 ms per forward), while replicating keeps the
whole [V, E] table on every rank: 10.8 MB instead of 8.7 MB per rank there, and for opt-1.3b at TP 8
in fp16 0.52 GB instead of 0.34 GB per rank (`memory_table`). The model file knows nothing of
ranks; this module only sets the head count each attention module reshapes by (its local heads).
"""

from __future__ import annotations

import atexit
import math
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from opt_core import Head, OPTConfig
from opt_core.checkpoint import (
    DEFAULT_SHARD_BYTES,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    CheckpointLoad,
    open_checkpoint,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from opt_core.params import hf_name, parameter_table
from opt_torch.arrays import numpy_to_tensor

TP_PLANS = ("auto",)
_CHUNK_BYTES = 2 << 20  # rows read at a time when a rank keeps only some columns of a tensor

# Canonical module name pattern ("*" = a layer index) -> how it is split (see `_STYLES`).
TENSOR_PARALLEL_PLAN: dict[str, str] = {
    "decoder.layers.*.self_attn.q_proj": "colwise",
    "decoder.layers.*.self_attn.k_proj": "colwise",
    "decoder.layers.*.self_attn.v_proj": "colwise",
    "decoder.layers.*.self_attn.out_proj": "rowwise",
    "decoder.layers.*.fc1": "colwise",
    "decoder.layers.*.fc2": "rowwise",
}
VOCAB_PARALLEL_PLAN: dict[str, str] = {
    "decoder.embed_tokens": "vocab_embedding",
    "lm_head": "vocab_logits",
}

# style -> {parameter leaf name: the dimension it is split on}; leaves not listed are replicated.
SPLIT_DIMS: dict[str, dict[str, int]] = {
    "colwise": {"weight": 0, "bias": 0},
    "rowwise": {"weight": 1},
    "vocab_embedding": {"weight": 0},
    "vocab_logits": {"weight": 0},
}


def _style(kind: str) -> ParallelStyle:
    if kind == "colwise":
        return ColwiseParallel()  # replicated input, output split on its last dim (heads / ffn)
    if kind == "rowwise":
        return RowwiseParallel()  # input split on its last dim, output all-reduced
    if kind == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate())  # ids replicated, rows of the table split
    if kind == "vocab_logits":
        return ColwiseParallel(output_layouts=Replicate())  # logits all-gathered over the vocabulary
    raise ValueError(f"unknown tensor-parallel style {kind!r}")


def tensor_parallel_plan(head: Head | str, vocab_parallel: bool = True) -> dict[str, str]:
    """Canonical module pattern -> style for a model of kind `head` (the plan every rank applies)."""
    plan = dict(TENSOR_PARALLEL_PLAN)
    if vocab_parallel:
        plan["decoder.embed_tokens"] = VOCAB_PARALLEL_PLAN["decoder.embed_tokens"]
        if Head(head) is Head.CAUSAL_LM:
            plan["lm_head"] = VOCAB_PARALLEL_PLAN["lm_head"]
    return plan


def _pattern(module_pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(module_pattern).replace(r"\*", r"\d+") + r"\.(weight|bias)$")


def split_dim(name: str, plan: dict[str, str]) -> int | None:
    """The dimension the canonical parameter `name` is split on under `plan` (None: replicated)."""
    for module, kind in plan.items():
        m = _pattern(module).fullmatch(name)
        if m:
            return SPLIT_DIMS[kind].get(m.group(1))
    return None


def per_rank_parameter_bytes(
    config: OPTConfig, tp: int, bytes_per_parameter: int = 2, head: Head | str = Head.CAUSAL_LM,
    vocab_parallel: bool = True,
) -> int:
    """Parameter bytes one rank holds at tensor-parallel degree `tp`, from the canonical table
    (a tied lm_head counted once; split dimensions divided by `tp`)."""
    plan = tensor_parallel_plan(head, vocab_parallel)
    total = 0
    for spec in parameter_table(config, head):
        if spec.tied_to is not None:
            continue
        dim = split_dim(spec.name, plan)
        total += spec.numel // tp if dim is not None else spec.numel
    return total * bytes_per_parameter


def memory_table(presets: tuple[str, ...] = ("opt-1.3b", "opt-6.7b", "opt-66b"), degrees: tuple[int, ...] = (2, 4, 8),
                 bytes_per_parameter: int = 2) -> str:
    """A Markdown table of per-rank parameter GB (1e9 bytes) of causal-LM presets at each TP degree,
    vocab-parallel (and, in brackets, with replicated embeddings): `python -m opt_torch.parallel`."""
    from opt_core.params import parameter_count

    head = "| model | 1 rank | " + " | ".join(f"TP {d}" for d in degrees) + " |"
    lines = [head, "|" + "---|" * (len(degrees) + 2)]
    for name in presets:
        config = OPTConfig.from_preset(name)
        cells = [f"{per_rank_parameter_bytes(config, d, bytes_per_parameter) / 1e9:.2f} "
                 f"({per_rank_parameter_bytes(config, d, bytes_per_parameter, vocab_parallel=False) / 1e9:.2f})"
                 for d in degrees]
        whole = parameter_count(config) * bytes_per_parameter / 1e9
        lines.append(f"| {name} | {whole:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its local shards of DTensors; tied tensors once)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


# ---------------------------------------------------------------- mesh
def _require_launch(what: str) -> None:
    """ValueError naming `what` when this process is neither in a torch.distributed group nor
    started by a distributed launcher (torchrun sets WORLD_SIZE)."""
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"{what} over the processes of a distributed launch; run under "
            "`torchrun --nproc-per-node N ...` (or initialise torch.distributed yourself)"
        )


def tensor_parallel_mesh(tp_plan: str | None = "auto", device_mesh: DeviceMesh | None = None) -> DeviceMesh:
    """The 1-D mesh to shard over: `device_mesh` (its "tp" dimension when it has one), or, for
    `tp_plan="auto"`, every process of the job torchrun started (the process group is created when
    none exists: NCCL when CUDA is available, gloo otherwise).

    Raises:
        ValueError: an unknown plan, or "auto" outside a distributed launch.
    """
    if device_mesh is not None:
        if device_mesh.ndim == 1:
            return device_mesh
        if "tp" in (device_mesh.mesh_dim_names or ()):
            return device_mesh["tp"]
        raise ValueError("a multi-dimensional device_mesh needs a dimension named 'tp' for tensor parallelism")
    if tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan must be one of {TP_PLANS} (or pass device_mesh=), got {tp_plan!r}")
    if not dist.is_initialized():
        _require_launch("tp_plan='auto' shards the model")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # The group is ours, so we close it: a group left open at interpreter exit can abort a rank
        # while another is still tearing down its connections.
        atexit.register(_close_process_group)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_divisible(config: OPTConfig, tp: int, vocab_parallel: bool) -> None:
    sizes = {"num_attention_heads": config.num_attention_heads, "ffn_dim": config.ffn_dim}
    if vocab_parallel:
        sizes["vocab_size"] = config.vocab_size
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise ValueError(f"tensor parallelism over {tp} ranks needs {', '.join(bad)} divisible by {tp}")


# ---------------------------------------------------------------- applying the plan
def parallelize(model: nn.Module, mesh: DeviceMesh, vocab_parallel: bool = True) -> nn.Module:
    """Apply the plan to `model` (in place; on the meta device or with real weights) over the 1-D
    `mesh`. Returns `model`, with `model.device_mesh` set.

    Raises:
        ValueError: heads, ffn_dim or (vocab-parallel) the vocabulary not divisible by the mesh size.
    """
    config: OPTConfig = model.config
    tp = mesh.size()
    _check_divisible(config, tp, vocab_parallel)
    prefix = "" if model.head is Head.BASE else "model."
    plan = {
        (prefix + p if p.startswith("decoder.") else p): _style(kind)
        for p, kind in tensor_parallel_plan(model.head, vocab_parallel).items()
    }
    parallelize_module(model, mesh, plan)
    for layer in model.get_decoder().layers:
        layer.self_attn.num_heads = config.num_attention_heads // tp  # the heads this rank holds
    _retie(model)
    model.device_mesh = mesh
    return model


def _retie(model: nn.Module) -> None:
    """Share lm_head with the token table again (distributing or materialising replaced both)."""
    if model.head is Head.CAUSAL_LM and model.config.tie_word_embeddings:
        model.lm_head.weight = model.get_decoder().embed_tokens.weight


def _same_rng_on_every_rank(mesh: DeviceMesh) -> None:
    """Seed the global torch RNG identically on every rank (rank 0's draw), so that sampling
    without a seed and a freshly initialised head still agree across ranks."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    group = mesh.get_group()
    if mesh.device_type == "cuda":
        seed = seed.cuda()
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    torch.manual_seed(int(seed.cpu()))


def rank0_value(mesh: DeviceMesh, value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank of `mesh`; generation uses it for a
    fresh sampling seed, which every rank must share to draw the same tokens."""
    box = [value]
    group = mesh.get_group()
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _local_slice(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """The tensor to fill on this rank and the index of the checkpoint tensor it holds."""
    full = [slice(0, n) for n in param.shape]
    if not isinstance(param, DTensor):
        return param, tuple(full)
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            n = param.device_mesh.size(mesh_dim)
            rank = param.device_mesh.get_local_rank(mesh_dim)
            per = param.shape[placement.dim] // n  # even splits (checked by `_check_divisible`)
            full[placement.dim] = slice(rank * per, (rank + 1) * per)
    return param.to_local(), tuple(full)


def fill_shards(model: nn.Module, ckpt: CheckpointLoad) -> None:
    """Fill this rank's part of every parameter of `model` (DTensor shards, replicated tensors)
    from `ckpt`, through `CheckpointLoad.get_slice`: a split on the rows (column-wise layers, the
    vocabulary) reads only those rows; a split on the columns (row-wise layers) reads the rows a few
    at a time and keeps its columns, so no rank ever holds a whole tensor it does not own."""
    config, head, acc = ckpt.config, ckpt.head, ckpt.accounting
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in ckpt.names:
            local, index = _local_slice(params[hf_name(name, head)])
            stored = ckpt.get_slice(name)
            rows, rest = index[0], index[1:]
            row_bytes = max(1, math.prod(stored.shape[1:]) * stored.dtype.itemsize)
            step = max(1, _CHUNK_BYTES // row_bytes)
            for r in range(rows.start, rows.stop, step):
                piece = stored[(slice(r, min(r + step, rows.stop)), *rest)]
                local[r - rows.start : r - rows.start + piece.shape[0]].copy_(numpy_to_tensor(piece))
        for name in acc.tied:  # a tied head stored apart, or not at all: it is the embedding
            spec = next(s for s in parameter_table(config, head) if s.name == name)
            target, source = params[hf_name(name, head)], params[hf_name(spec.tied_to, head)]
            if target is not source:
                target.copy_(source)
        for name in acc.new_head:  # the same RNG on every rank, so replicated heads agree
            model.init_weights(model.get_submodule(hf_name(name, head).rsplit(".", 1)[0]))


def from_pretrained_tp(
    cls: Any,
    folder: str | os.PathLike[str],
    config: OPTConfig,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    tp_plan: str | None = "auto",
    device_mesh: DeviceMesh | None = None,
    vocab_parallel: bool = True,
) -> nn.Module:
    """`opt_torch.io.from_pretrained` with tensor parallelism: build the model on the meta device,
    apply the plan, materialise only this rank's shards and read only their slices (any format the
    checkpoint readers know; safetensors reads the slices straight from the file).

    Raises:
        ValueError: bad plan or mesh, sizes not divisible by the mesh.
        FileNotFoundError / CheckpointError: as `from_pretrained`.
    """
    mesh = tensor_parallel_mesh(tp_plan, device_mesh)
    with open_checkpoint(folder, config, cls.head) as ckpt:
        old_dtype = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with torch.device("meta"):
                model = cls(config, attn_implementation=attn_implementation)
        finally:
            torch.set_default_dtype(old_dtype)
        parallelize(model, mesh, vocab_parallel)
        cuda = mesh.device_type == "cuda"
        model.to_empty(device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
        _retie(model)
        _same_rng_on_every_rank(mesh)
        fill_shards(model, ckpt)
    model.loading_info = ckpt.accounting
    return model.eval()


# ---------------------------------------------------------------- FSDP2 (training)
def data_parallel_mesh(device_mesh: DeviceMesh | None = None) -> DeviceMesh:
    """The 1-D mesh FSDP shards over: `device_mesh`, or every process of the torchrun job (the
    process group is created when none exists, as in `tensor_parallel_mesh`)."""
    if device_mesh is not None:
        return device_mesh
    _require_launch("fsdp=True shards parameters, gradients and optimizer state")
    mesh = tensor_parallel_mesh("auto")
    return init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("dp",))


def shard_for_training(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` every decoder layer, then the root (embeddings, final norm, heads; a tied
    lm_head stays one parameter there). Parameters, gradients and optimizer state are then split
    over `mesh`; each layer's weights are gathered just for its forward and backward."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        # The fused q/k/v buffer (inference layout) would stay behind as a full unsharded copy.
        layer.self_attn._qkv = None
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model.device_mesh = mesh
    return model


def rows_of_rank(batch: dict[str, Any], mesh: DeviceMesh) -> dict[str, Any]:
    """This rank's contiguous share of the rows of a global batch (every rank draws the same one).

    Raises:
        ValueError: the batch does not split evenly over the mesh.
    """
    n, rank = mesh.size(), mesh.get_local_rank()
    rows = len(next(iter(batch.values())))
    if rows % n:
        raise ValueError(f"a global batch of {rows} rows does not split over {n} ranks; use a multiple of {n}")
    per = rows // n
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def mean_over_ranks(value: float, mesh: DeviceMesh) -> float:
    """The mean of a Python float over the ranks of `mesh`."""
    t = torch.tensor([value], dtype=torch.float64, device=mesh.device_type)
    dist.all_reduce(t, group=mesh.get_group())
    return float(t.cpu()) / mesh.size()


def save_pretrained_gathered(
    model: nn.Module, folder: str | os.PathLike[str], max_shard_size: int | str = DEFAULT_SHARD_BYTES
) -> None:
    """Write a normal Hugging Face folder of a sharded (FSDP / TP) model from rank 0: every rank
    takes part in gathering one tensor at a time, rank 0 keeps it and writes each safetensors shard as
    soon as it is complete, so rank 0 never holds more than one shard of full tensors."""
    from safetensors.torch import save_file

    from opt_core.checkpoint import is_weight_file
    from opt_core.transaction import WriteTransaction

    rank0 = dist.get_rank() == 0
    config: OPTConfig = model.config
    head = model.head
    state = model.state_dict()
    names = [hf_name(s.name, head) for s in parameter_table(config, head) if s.tied_to is None]
    sizes = {k: state[k].numel() * state[k].element_size() for k in names}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    files = shard_file_names(SAFETENSORS, len(shards))
    # rank 0 writes a fresh temporary folder and swaps it in whole (opt_core.transaction): the
    # folder's other files stay, and an interruption leaves the previous save as it was
    tx = WriteTransaction(folder, merge=True, stale=is_weight_file, what="save_pretrained folder") if rank0 else None
    try:
        if tx is not None:
            tx.begin()
            out = tx.path
            dtype = str(state[names[0]].dtype).removeprefix("torch.")
            extra = dict(config.extra) | {"architectures": [type(model).__name__]}
            config.replace(torch_dtype=dtype, extra=extra).save_pretrained(out)
        for shard, name in zip(shards, files):
            tensors = {}
            for key in shard:
                t = state[key]
                full = t.full_tensor() if isinstance(t, DTensor) else t  # collective: every rank calls it
                if rank0:
                    tensors[key] = full.detach().cpu().contiguous().clone()
                del full
            if tx is not None:
                save_file(tensors, str(out / f".{name}.tmp"), metadata={"format": "pt"})
                os.replace(out / f".{name}.tmp", out / name)
            del tensors
        if tx is not None:
            if len(shards) > 1:
                write_index(out / SAFETENSORS_INDEX, {k: n for shard, n in zip(shards, files) for k in shard},
                            sum(sizes.values()))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(out)
            tx.commit()
    finally:
        if tx is not None:
            tx.abort()  # nothing once committed
    dist.barrier()


def save_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str],
                            step: int) -> None:
    """Every rank writes its shards of the model and optimizer state (`torch.distributed.checkpoint`)
    into `folder`; `load_sharded_checkpoint` resumes from it on the same number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "step": torch.tensor(step)}, checkpoint_id=str(folder))


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str]) -> int:
    """Read what `save_sharded_checkpoint` wrote into `model` and `optimizer` (in place); returns
    the number of optimiser steps done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["step"])


if __name__ == "__main__":
    print(memory_table())
