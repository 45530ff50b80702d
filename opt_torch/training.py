"""Training and fine-tuning loops for the PyTorch backend.

    from opt_core.data import load_text_datasets
    from opt_core.training_args import TrainingArguments
    from opt_torch import OPTForCausalLM
    from opt_torch.training import train_causal_lm

    args = TrainingArguments(max_steps=500, batch_size=16, block_size=256, output_dir="out")
    train, val = load_text_datasets("corpus.txt", tokenizer, args.block_size)
    result = train_causal_lm(model, train, args, eval_data=val, tokenizer=tokenizer)
    result.losses, result.evals[-1]["perplexity"]

One optimiser step = `gradient_accumulation_steps` micro-batches; AdamW with decoupled weight decay
on matrices and embeddings only (`opt_core.training_args.decays`), the learning rate set every step
from `TrainingArguments.learning_rate_at` (the schedule every backend shares), global-norm clipping,
optional bfloat16 autocast and per-layer gradient checkpointing. Losses are computed here from the
model's logits, so the three backends define them identically.

`fsdp=True` (under `torchrun --nproc-per-node N`) shards parameters, gradients and optimizer state
with FSDP2 (`opt_torch.parallel.shard_for_training`); every rank draws the same global batch and
trains on its share of the rows, so the loss curve is one process's on the same global batch. Rank 0
logs and writes the Hugging Face folders (gathered tensor by tensor); every checkpoint folder also
holds `distributed/`, a sharded `torch.distributed.checkpoint` of model and optimizer, which
`resume_from=` continues from on the same number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from opt_core.data import ArrayDataset, TextDataset
from opt_core.training import (
    TRAINER_LOG_NAME,
    Batch,
    Log,
    TrainingProgress,
    TrainResult,
    causal_lm_batches,
    evaluate_blocks,
    fine_tuning_batches,
)
from opt_core.training_args import TrainingArguments, decays
from opt_torch.losses import IGNORE_INDEX, causal_lm_loss

__all__ = [
    "TrainResult",
    "enable_gradient_checkpointing",
    "evaluate_causal_lm",
    "make_training_optimizer",
    "train_causal_lm",
    "train_question_answering",
    "train_sequence_classification",
]

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


# ---------------------------------------------------------------- losses (the heads' own, opt_torch.losses)
def _causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's loss with padding targets ignored (a target counts when its attention_mask is 1)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's loss: by `config.problem_type` (inferred as Hugging Face when None)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss


def _question_answering_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's loss: positions clamped to [0, T], T ignored."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
        start_positions=batch["start_positions"], end_positions=batch["end_positions"],
    ).loss


# ---------------------------------------------------------------- optimiser
def make_training_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2+ dims only (tied weights counted once); the
    learning rate is set per step by `_fit` from `args.learning_rate_at`."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if decays(tuple(p.shape))]
    no_decay = [p for p in params if not decays(tuple(p.shape))]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate_at(0),
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Uses the model's own `gradient_checkpointing_enable()` when it has one; otherwise wraps the
    forward of every module in the decoder's `layers` list with `torch.utils.checkpoint`.
    Returns the number of layers wrapped (-1 when the model handled it).

    Raises:
        ValueError: when the model has neither.
    """
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        return -1
    wrapped = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            for layer in module:
                if getattr(layer, "_opt_checkpointed", False):
                    continue
                forward = layer.forward

                def run(*a: Any, _forward: Callable[..., Any] = forward, _layer: torch.nn.Module = layer,
                        **kw: Any) -> Any:
                    if _layer.training and torch.is_grad_enabled():
                        return checkpoint(_forward, *a, use_reentrant=False, **kw)
                    return _forward(*a, **kw)

                layer.forward = run  # type: ignore[method-assign]
                layer._opt_checkpointed = True  # type: ignore[assignment]
                wrapped += 1
    if not wrapped:
        raise ValueError("found no decoder `layers` list to checkpoint in this model")
    return wrapped


# ---------------------------------------------------------------- evaluation
def evaluate_causal_lm(
    model: torch.nn.Module,
    data: TextDataset | np.ndarray,
    batch_size: int = 16,
    max_batches: int | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Validation loss over full blocks: `{"loss", "perplexity", "tokens"}` (loss per predicted token).

    Raises:
        ValueError: when `data` holds no block.
    """
    device = _device(model)

    @torch.no_grad()
    def loss_sums(ids: np.ndarray) -> tuple[float, int]:
        input_ids = torch.as_tensor(ids, device=device)
        with _autocast(bf16, device):
            logits = model(input_ids=input_ids).logits
        return float(causal_lm_loss(logits, input_ids, reduction="sum")), int(input_ids[:, 1:].numel())

    was_training = model.training
    model.eval()
    try:
        return evaluate_blocks(data, batch_size, max_batches, loss_sums)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- training
def train_causal_lm(
    model: torch.nn.Module,
    train_data: TextDataset | np.ndarray,
    args: TrainingArguments,
    eval_data: TextDataset | np.ndarray | None = None,
    tokenizer: Any = None,
    log: Log | None = print,
    fsdp: bool = False,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train (or fine-tune) a causal LM on packed blocks; returns the losses and validation passes.

    Args:
        model: an `OPTForCausalLM` (or anything called as `model(input_ids=, attention_mask=)`
            returning `.logits`); trained in place.
        train_data: a `TextDataset` or an int array [n_blocks, block_size].
        args: hyper-parameters; `args.output_dir` (when set) receives the final model
            (`save_pretrained`), `checkpoint-STEP/` folders every `save_every` steps, the tokenizer,
            `training_args.json` and `trainer_log.json`.
        eval_data: validation blocks, evaluated every `eval_every` steps and at the end.
        tokenizer: saved with every checkpoint when given.
        log: called with one line of progress every `log_every` steps; None for silence.
        fsdp: shard with FSDP2 over the processes of a torchrun job (see the module docstring).
        resume_from: a `checkpoint-STEP/` folder written by an FSDP run: continue from its sharded
            state (same number of ranks) to `args.max_steps`, on the same data stream.

    Raises:
        ValueError: when the blocks are longer than the model's context, or (fsdp) the batch does
            not split over the ranks.
        FloatingPointError: when the loss stops being finite.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    batches = causal_lm_batches(train_data, args, context)

    def evaluate() -> dict[str, float]:
        assert eval_data is not None
        return evaluate_causal_lm(model, eval_data, args.batch_size, args.eval_batches, args.bf16)

    return _fit(model, batches, _causal_lm_loss, args, evaluate if eval_data is not None else None, tokenizer, log,
                fsdp, resume_from)


def train_sequence_classification(
    model: torch.nn.Module,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForSequenceClassification` on rows of `input_ids`, `attention_mask` and
    `labels` (int class ids; float for regression / multi-label): cross-entropy (or MSE / BCE)."""
    batches = fine_tuning_batches(data, args, ("input_ids", "labels"))
    return _fit(model, batches, _classification_loss, args, None, tokenizer, log)


def train_question_answering(
    model: torch.nn.Module,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Log | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForQuestionAnswering` on rows of `input_ids`, `attention_mask`,
    `start_positions` and `end_positions`: the mean of the start and end cross-entropies."""
    batches = fine_tuning_batches(data, args, ("input_ids", "start_positions", "end_positions"))
    return _fit(model, batches, _question_answering_loss, args, None, tokenizer, log)


def _fit(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    args: TrainingArguments,
    evaluate: Callable[[], dict[str, float]] | None,
    tokenizer: Any,
    log: Log | None,
    fsdp: bool = False,
    resume_from: str | Path | None = None,
) -> TrainResult:
    torch.manual_seed(args.seed)  # dropout masks
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    mesh = None
    if fsdp:
        from opt_torch import parallel

        mesh = parallel.data_parallel_mesh()
        if args.batch_size % mesh.size():
            raise ValueError(f"batch_size {args.batch_size} does not split over {mesh.size()} FSDP ranks")
        parallel.shard_for_training(model, mesh)
    elif resume_from is not None:
        raise ValueError("resume_from= continues an FSDP run (its sharded checkpoint); pass fsdp=True")
    device = _device(model)
    optimizer = make_training_optimizer(model, args)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    if mesh is None:
        progress = TrainingProgress(model, args, evaluate, tokenizer, log)
    else:
        progress = _ShardedProgress(model, optimizer, mesh, args, evaluate, tokenizer, log)
    first = progress.resume(Path(resume_from)) if resume_from is not None else 0
    for _ in range(first * args.gradient_accumulation_steps):
        next(batches)  # the same data stream as an uninterrupted run
    for step in range(first, args.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate_at(step)
        loss, tokens = 0.0, 0
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            if mesh is not None:
                batch = parallel.rows_of_rank(batch, mesh)  # this rank's share of the global batch
            batch = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
            with _autocast(args.bf16, device):
                micro_loss = loss_fn(model, batch)
            (micro_loss / args.gradient_accumulation_steps).backward()
            loss += float(micro_loss.detach()) / args.gradient_accumulation_steps
            tokens += int(batch["input_ids"].numel())
        if mesh is not None:
            # Every rank's share has as many predicted tokens (packed blocks, or rows of equal
            # length), so the mean of the ranks' means is the global batch's mean; FSDP averages
            # the gradients the same way.
            loss = parallel.mean_over_ranks(loss, mesh)
            tokens *= mesh.size()
        if args.max_grad_norm is not None:
            norm = _full(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        else:
            norm = _full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.record_step(step, loss, norm, tokens)
    return progress.finish()


def _full(norm: torch.Tensor) -> float:
    """A gradient norm as a float (a DTensor norm of sharded gradients is reduced first)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class _ShardedProgress(TrainingProgress):
    """`TrainingProgress` for FSDP: only rank 0 logs and writes files; every rank takes part in
    gathering the weights for the Hugging Face folder and writes its shards of the sharded
    checkpoint (`distributed/` in each checkpoint folder)."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, mesh: Any, args: TrainingArguments,
                 evaluate: Callable[[], dict[str, float]] | None, tokenizer: Any, log: Log | None) -> None:
        from opt_torch import parallel

        self.rank0 = mesh.get_local_rank() == 0
        super().__init__(_GatheredSaver(model), args, evaluate, tokenizer, log if self.rank0 else None)
        self.sharded_model, self.optimizer, self.parallel = model, optimizer, parallel
        self.step = 0

    def record_step(self, step: int, loss: float, grad_norm: float | None, tokens: int) -> None:
        self.step = step + 1
        super().record_step(step, loss, grad_norm, tokens)

    def save(self, folder: Path) -> None:
        if self.rank0:
            super().save(folder)  # its model.save_pretrained is the collective gathered save
        else:
            self.model.save_pretrained(folder)
        self.parallel.save_sharded_checkpoint(self.sharded_model, self.optimizer, folder / "distributed", self.step)

    def resume(self, folder: Path) -> int:
        """Load the sharded state and the log so far from a checkpoint folder; returns its step."""
        step = self.parallel.load_sharded_checkpoint(self.sharded_model, self.optimizer, folder / "distributed")
        from opt_core.safe_files import read_json

        done = read_json(folder / TRAINER_LOG_NAME, what="trainer log", expect=dict)
        r = self.result
        r.losses, r.learning_rates, r.grad_norms = done["losses"], done["learning_rates"], done["grad_norms"]
        r.evals, r.tokens = done["evals"], done["tokens"]
        self.step = step
        return step


class _GatheredSaver:
    """What `TrainingProgress` saves under FSDP: `save_pretrained` gathers and rank 0 writes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def save_pretrained(self, folder: Any) -> None:
        from opt_torch.parallel import save_pretrained_gathered

        save_pretrained_gathered(self.model, folder)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(bf16: bool, device: torch.device | None = None) -> Any:
    """bfloat16 autocast on the model's device when `bf16`; a no-op context otherwise."""
    return torch.autocast((device or torch.device("cpu")).type, dtype=torch.bfloat16, enabled=bf16)
