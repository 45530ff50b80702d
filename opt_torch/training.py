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
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opt_core.data import ArrayDataset, TextDataset
from opt_core.training_args import TrainingArguments, decays, perplexity

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@dataclass
class TrainResult:
    """What a training run did: one loss and learning rate per optimiser step, the validation passes
    (`{"step", "loss", "perplexity", "tokens"}`), wall time and tokens seen."""

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "losses": self.losses,
            "learning_rates": self.learning_rates,
            "grad_norms": self.grad_norms,
            "evals": self.evals,
            "seconds": self.seconds,
            "tokens": self.tokens,
        }


# ---------------------------------------------------------------- losses
def causal_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    Position t predicts token t + 1; a target is counted when its attention_mask is 1.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def _causal_lm_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    mask = batch.get("attention_mask")
    out = model(input_ids=batch["input_ids"], attention_mask=mask)
    total, count = causal_lm_loss(out.logits, batch["input_ids"], mask)
    return total / max(count, 1), count


def _classification_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    labels = batch["labels"]
    if labels.is_floating_point():  # regression (num_labels == 1) or multi-label targets
        if out.logits.shape[-1] == 1:
            return F.mse_loss(out.logits.float().squeeze(-1), labels.float()), len(labels)
        return F.binary_cross_entropy_with_logits(out.logits.float(), labels.float()), len(labels)
    return F.cross_entropy(out.logits.float(), labels), len(labels)


def _question_answering_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    start = F.cross_entropy(out.start_logits.float(), batch["start_positions"])
    end = F.cross_entropy(out.end_logits.float(), batch["end_positions"])
    return (start + end) / 2, len(batch["start_positions"])


# ---------------------------------------------------------------- optimiser and memory
def make_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2+ dims only (tied weights counted once)."""
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
@torch.no_grad()
def evaluate_causal_lm(
    model: torch.nn.Module,
    data: TextDataset | np.ndarray,
    batch_size: int = 16,
    max_batches: int | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Validation loss over full blocks: `{"loss", "perplexity", "tokens"}` (loss per predicted token)."""
    blocks = data.blocks if isinstance(data, TextDataset) else np.asarray(data)
    if len(blocks) == 0:
        raise ValueError("evaluation data holds no complete block")
    was_training = model.training
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        ids = torch.as_tensor(blocks[start : start + batch_size], device=device)
        with _autocast(bf16, device):
            logits = model(input_ids=ids).logits
        loss, n = causal_lm_loss(logits, ids)
        total += float(loss)
        count += n
    model.train(was_training)
    return {"loss": total / count, "perplexity": perplexity(total, count), "tokens": count}


# ---------------------------------------------------------------- training
def train_causal_lm(
    model: torch.nn.Module,
    train_data: TextDataset | np.ndarray,
    args: TrainingArguments,
    eval_data: TextDataset | np.ndarray | None = None,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = print,
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
        log: called with one line of progress every `log_every` steps; None for silence.
    """
    blocks = train_data if isinstance(train_data, TextDataset) else TextDataset(np.asarray(train_data))
    if blocks.block_size > getattr(getattr(model, "config", None), "max_position_embeddings", blocks.block_size):
        raise ValueError(
            f"blocks of {blocks.block_size} tokens are longer than the model's context "
            f"({model.config.max_position_embeddings})"
        )
    batches = ({"input_ids": b} for b in blocks.stream(args.batch_size, seed=args.seed))

    def evaluate() -> dict[str, float]:
        assert eval_data is not None
        return evaluate_causal_lm(model, eval_data, args.batch_size, args.eval_batches, args.bf16)

    return _fit(model, batches, _causal_lm_step, args, evaluate if eval_data is not None else None, tokenizer, log)


def train_sequence_classification(
    model: torch.nn.Module,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForSequenceClassification` on rows of `input_ids`, `attention_mask` and
    `labels` (int class ids; float for regression / multi-label): cross-entropy (or MSE / BCE)."""
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    _require(ds, ("input_ids", "labels"))
    return _fit(model, ds.stream(args.batch_size, args.seed), _classification_step, args, None, tokenizer, log)


def train_question_answering(
    model: torch.nn.Module,
    data: ArrayDataset | dict[str, np.ndarray],
    args: TrainingArguments,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Fine-tune an `OPTForQuestionAnswering` on rows of `input_ids`, `attention_mask`,
    `start_positions` and `end_positions`: the mean of the start and end cross-entropies."""
    ds = data if isinstance(data, ArrayDataset) else ArrayDataset(dict(data))
    _require(ds, ("input_ids", "start_positions", "end_positions"))
    return _fit(model, ds.stream(args.batch_size, args.seed), _question_answering_step, args, None, tokenizer, log)


def _require(ds: ArrayDataset, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in ds.arrays]
    if missing:
        raise ValueError(f"the training data lacks {', '.join(missing)} (has {', '.join(ds.arrays)})")


def _fit(
    model: torch.nn.Module,
    batches: Iterator[dict[str, np.ndarray]],
    step_loss: LossFn,
    args: TrainingArguments,
    evaluate: Callable[[], dict[str, float]] | None,
    tokenizer: Any,
    log: Callable[[str], None] | None,
) -> TrainResult:
    torch.manual_seed(args.seed)  # dropout masks
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    device = _device(model)
    optimizer = make_optimizer(model, args)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out_dir = Path(args.output_dir) if args.output_dir else None
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    for step in range(args.max_steps):
        lr = args.learning_rate_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss_value = 0.0
        for _ in range(args.gradient_accumulation_steps):
            batch = {k: torch.as_tensor(v, device=device) for k, v in next(batches).items()}
            with _autocast(args.bf16, device):
                loss, _count = step_loss(model, batch)
            (loss / args.gradient_accumulation_steps).backward()
            step_loss_value += float(loss.detach()) / args.gradient_accumulation_steps
            result.tokens += int(batch["input_ids"].numel())
        if args.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss_value):
            raise FloatingPointError(f"the loss became {step_loss_value} at step {step}; lower the learning rate")
        result.losses.append(step_loss_value)
        result.learning_rates.append(lr)
        result.grad_norms.append(norm)
        done = step + 1
        if log and (done % args.log_every == 0 or done == args.max_steps):
            elapsed = time.perf_counter() - start
            log(f"step {done}/{args.max_steps}  loss {step_loss_value:.4f}  lr {lr:.2e}  "
                f"grad-norm {norm:.3f}  {result.tokens / elapsed:,.0f} tok/s  {elapsed:.0f} s")
        if evaluate and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            ev = evaluate()
            result.evals.append({"step": done, **ev})
            model.train()
            if log:
                log(f"step {done}  validation loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}  "
                    f"({ev['tokens']} tokens)")
        if out_dir and args.save_every and done % args.save_every == 0 and done != args.max_steps:
            _save(model, out_dir / f"checkpoint-{done}", tokenizer, args, result, start)
    result.seconds = time.perf_counter() - start
    if out_dir:
        _save(model, out_dir, tokenizer, args, result, start)
    return result


def _save(model: torch.nn.Module, folder: Path, tokenizer: Any, args: TrainingArguments,
          result: TrainResult, start: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    args.save(folder)
    log = result.to_dict() | {"seconds": time.perf_counter() - start}
    (folder / "trainer_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(bf16: bool, device: torch.device | None = None) -> Any:
    """bfloat16 autocast on the model's device when `bf16`; a no-op context otherwise."""
    return torch.autocast((device or torch.device("cpu")).type, dtype=torch.bfloat16, enabled=bf16)
