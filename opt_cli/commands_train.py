"""`opt train`: train (or fine-tune) a causal-LM OPT on a text file in one command.

    opt train --corpus tinyshakespeare.txt --out my-model                 # tokenizer + model from scratch
    opt train --corpus more.txt --init bundled --out tuned --steps 100    # fine-tune an existing model
    opt train --corpus more.txt --init bundled --out adapter --lora-r 8   # a LoRA adapter (docs/lora.md)

The last `--validation-fraction` of the text is held out and reported as perplexity. The output
folder is a Hugging Face-layout model folder (config, weights, tokenizer, generation config) plus
`training_args.json` and `trainer_log.json`. With `--lora-r`, only a LoRA adapter on the frozen
`--init` model trains, and `--out` receives the adapter in PEFT's files (adapter_config.json,
adapter_model.safetensors) and training_summary.json, not a copy of the base.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from opt_cli.backends import BACKENDS, adapter, distributed
from opt_cli.errors import UsageError
from opt_cli.options import (
    add_backend_argument,
    add_threads_argument,
    apply_threads,
    float_in,
    int_in,
    is_first_rank,
    positive_int,
    print_on_first_rank_only,
    require_distributed_launch,
)
from opt_cli.paths import input_file, model_folder, output_folder, output_transaction, tokenizer_folder
from opt_cli.registry import register


def add_model_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a new model (ignored with --init)")
    g.add_argument("--vocab-size", type=int_in(260), default=4096, help="BPE vocabulary of a newly trained tokenizer")
    g.add_argument("--hidden-size", type=positive_int, default=256, help="model width")
    g.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    g.add_argument("--heads", type=positive_int, default=4, help="attention heads (divide --hidden-size)")
    g.add_argument("--ffn-dim", type=positive_int, default=1024, help="feed-forward width")
    g.add_argument("--context", type=int_in(2), default=256, help="max_position_embeddings")
    g.add_argument("--dropout", type=float_in(0.0, 1.0), default=0.1, help="dropout probability")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (opt_core.training_args.TrainingArguments)")
    g.add_argument("--steps", type=positive_int, default=400, help="optimiser steps")
    g.add_argument("--batch-size", type=positive_int, default=8, help="rows per micro-batch")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--block-size", type=int_in(2), default=None,
                   help="tokens per row (default: the model's context)")
    g.add_argument("--lr", type=float_in(0.0, lo_open=True), default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float_in(0.0, 1.0), default=0.1, help="final learning rate / peak")
    g.add_argument("--warmup", type=int_in(0), default=40, help="linear warm-up steps (at most --steps)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine", help="decay after warm-up")
    g.add_argument("--weight-decay", type=float_in(0.0), default=0.1, help="AdamW decoupled weight decay")
    g.add_argument("--max-grad-norm", type=float_in(0.0), default=1.0, help="global-norm clipping (0: off)")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1, "an integer seed"), default=0,
                   help="initialisation and data-order seed")
    g.add_argument("--validation-fraction", type=float_in(0.0, 0.9), default=0.1, help="held-out tail of the text")
    g.add_argument("--eval-every", type=int_in(0), default=100,
                   help="steps between validation passes (0: end only)")
    g.add_argument("--eval-batches", type=positive_int, default=None, help="validation batches per pass (default: all)")
    g.add_argument("--save-every", type=int_in(0), default=0, help="steps between checkpoints (0: end only)")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16: autocast (torch), bf16 compute over float32 parameters (flax), Keras' "
                        "mixed_bfloat16 policy (tf)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layers in backward (torch and flax; tf has none)")
    g.add_argument("--fsdp", action="store_true", help="torch under torchrun: FSDP2 over the ranks, rank 0 saves")


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (opt_core.lora.LoraConfig; needs --init)")
    g.add_argument("--lora-r", type=positive_int, default=None,
                   help="train a rank-R LoRA adapter on the frozen --init model instead of all parameters")
    g.add_argument("--lora-alpha", type=float_in(0.0, lo_open=True), default=None,
                   help="adapter scaling numerator (default: 2 x --lora-r)")
    g.add_argument("--lora-dropout", type=float_in(0.0, 1.0), default=0.0, help="dropout on the adapter input")
    g.add_argument("--lora-targets", default="q_proj,v_proj", metavar="NAMES",
                   help="comma-separated layers to adapt (q_proj,k_proj,v_proj,out_proj,fc1,fc2)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")


def lora_config_of(args: argparse.Namespace, init: Path | None) -> Any:
    """The `LoraConfig` of the --lora-* arguments, or None without --lora-r."""
    if args.lora_r is None:
        return None
    from opt_core.lora import LoraConfig

    if init is None:
        raise UsageError("--lora-r adapts an existing model: pass --init DIR (or 'bundled')")
    if args.fsdp or args.save_every:
        raise UsageError("--lora-r does not combine with --fsdp or --save-every (the adapter is saved at the end)")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    try:
        return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                          target_modules=targets, use_rslora=args.rslora, base_model_name_or_path=str(init))
    except ValueError as e:
        raise UsageError(f"--lora-*: {e}") from None


@register("train", "Train or fine-tune a causal-LM OPT on a text file (tokenizer too, when new)")
def _train(p: argparse.ArgumentParser):
    p.add_argument("--corpus", required=True, metavar="FILE", help="UTF-8 text file to train on")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output model folder (new or empty); written whole at the end, so an interrupted run "
                        "leaves it as it was")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model a previous run wrote in --out (listed in its .opt-manifest.json; a plain "
                        "model folder too) once training has finished; a folder holding other files is refused")
    add_backend_argument(p)
    p.add_argument("--init", default=None, metavar="DIR",
                   help="model folder (or 'bundled') to fine-tune instead of a new model")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (or 'bundled') for a new model (default: train a BPE)")
    add_threads_argument(p)
    add_model_shape_arguments(p)
    add_training_arguments(p)
    add_lora_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from opt_core.data import read_text

        backend = adapter(args.backend)
        if args.gradient_checkpointing and not backend.checkpoints_gradients:
            have = [name for name in BACKENDS if adapter(name).checkpoints_gradients]
            raise UsageError(f"--gradient-checkpointing is available in {' and '.join(have)}, not {backend.name}")
        if args.fsdp:
            if not backend.distributed:
                raise UsageError(f"--fsdp needs a backend that trains under torchrun ({', '.join(distributed())}), "
                                 f"not {backend.name}")
            require_distributed_launch("--fsdp")
            print_on_first_rank_only()
        corpus = input_file(args.corpus, "--corpus")
        output_folder(args.out, args.overwrite, what="--out", inputs=[corpus])  # before reading anything large
        read_text(corpus)  # clear errors for an empty or non-UTF-8 corpus before any heavy import
        init = model_folder(args.init, "--init") if args.init else None
        # Everything is written into the transaction's temporary folder and swapped in at the end:
        # with --init X --out X the old model stays whole until the new one is complete.
        # Rank 0 owns the folder: it settles, creates, commits or removes the temporary folder.
        first = is_first_rank()
        lora_config = lora_config_of(args, init)  # before any work: --lora-r needs --init
        tx = output_transaction(args.out, args.overwrite, what="--out", inputs=[corpus], token=_job_token(args.out),
                                begin=first)
        try:
            return _train_into(args, backend, corpus, init, tx, lora_config)
        finally:
            if first:
                tx.abort()  # nothing when committed

    return run


def _job_token(out: str) -> str | None:
    """Every rank of a torchrun job writes into one temporary folder: its name comes from the job id."""
    import hashlib
    import os

    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    return hashlib.sha256(f"{run_id}\0{os.path.abspath(out)}".encode()).hexdigest()[:32]


def _train_into(args: argparse.Namespace, backend: Any, corpus: Path, init: Path | None, tx: Any,
                lora_config: Any = None) -> int:
    from opt_core import OPTConfig, OPTTokenizer
    from opt_core.data import load_text_datasets, read_text, split_text, train_tokenizer
    from opt_core.training_args import TrainingArguments

    out = tx.path
    replaced = tx.check_destination()
    if init is not None:
        tokenizer = OPTTokenizer.from_pretrained(tokenizer_folder(init, "--init"))
        config = OPTConfig.from_pretrained(init)
    else:
        if args.tokenizer:
            tokenizer = OPTTokenizer.from_pretrained(tokenizer_folder(args.tokenizer))
        else:
            train_text, _ = split_text(read_text(corpus), args.validation_fraction)
            print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on the training split")
            tokenizer = train_tokenizer(train_text, vocab_size=args.vocab_size)
            if len(tokenizer) < args.vocab_size:
                print(f"note: the BPE vocabulary has {len(tokenizer)} tokens, fewer than --vocab-size "
                      f"{args.vocab_size}: the corpus has no more merges to learn", file=sys.stderr)
        if args.hidden_size % args.heads:
            raise UsageError(f"--hidden-size {args.hidden_size} is not divisible by --heads {args.heads}")
        config = OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            ffn_dim=args.ffn_dim,
            max_position_embeddings=args.context,
            dropout=args.dropout,
            word_embed_proj_dim=args.hidden_size,
        )
    block = args.block_size or config.max_position_embeddings
    if block > config.max_position_embeddings:
        raise UsageError(f"--block-size {block} is longer than the model's context "
                         f"({config.max_position_embeddings})")
    warmup = args.warmup
    if warmup > args.steps:
        print(f"note: --warmup {warmup} is longer than the run (--steps {args.steps}); warming up for "
              f"{args.steps} steps", file=sys.stderr)
        warmup = args.steps
    targs = TrainingArguments(
        max_steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        block_size=block, learning_rate=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=warmup, lr_schedule=args.schedule,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        validation_fraction=args.validation_fraction, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
        # a LoRA run writes only the adapter, at the end (checkpoints would save the whole model)
        output_dir=None if lora_config else str(out), bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    train, val = load_text_datasets(corpus, tokenizer, block, args.validation_fraction)
    print(f"data: {corpus}: {train.num_tokens:,} training tokens in {len(train)} blocks of {block}, "
          f"{val.num_tokens:,} validation tokens ({len(val)} blocks)")
    backend.module()
    apply_threads(backend, args.threads)
    options = backend.bf16_training() if args.bf16 else {}  # before the model exists: some fix dtypes at build
    model = backend.load(init, **options) if init else backend.new(config, seed=args.seed, **options)
    if lora_config is not None:
        lora = backend.module("lora")
        lora.add_adapter(model, lora_config, seed=args.seed)
        print(f"LoRA: rank {lora_config.r} on {', '.join(lora_config.target_modules)}, scaling "
              f"{lora_config.scaling:g}; the base is frozen")
    from opt_core.params import parameter_count

    print(f"model: {parameter_count(config):,} parameters, {config.num_hidden_layers} layers x "
          f"{config.hidden_size} wide, context {config.max_position_embeddings}; backend {backend.name}")
    if replaced:
        print(f"--overwrite: the {len(replaced)} files of a previous run in {tx.dst} are replaced when "
              "training has finished")
    t0 = time.perf_counter()
    result = backend.trainer().train_causal_lm(model, train, targs, eval_data=val if len(val) else None,
                                               tokenizer=tokenizer, log=lambda line: print(line, flush=True),
                                               **({"fsdp": True} if args.fsdp else {}))
    if not is_first_rank():
        return 0  # rank 0 writes the folder
    if lora_config is not None:
        lora.save_adapter(model, out)
    else:
        write_generation_config(out, config)
    summary: dict[str, Any] = {
        "command": "opt " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name == "opt" else None,
        "arguments": {k: v for k, v in vars(args).items() if k != "handler"},
        "backend": backend.name,
        "parameters": parameter_count(config),
        "steps": result.steps,
        "tokens_seen": result.tokens,
        "final_train_loss": result.losses[-1],
        "mean_train_loss_last_10": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "validation": result.evals[-1] if result.evals else None,
        "seconds": time.perf_counter() - t0,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tx.commit()
    val_text = f", validation perplexity {result.evals[-1]['perplexity']:.2f}" if result.evals else ""
    print(f"saved {tx.dst}: {result.steps} steps in {summary['seconds']:.0f} s, final train loss "
          f"{result.losses[-1]:.4f}{val_text}")
    return 0


def write_generation_config(folder: Path, config: Any) -> None:
    """Hugging Face's `generation_config.json` (special-token ids), unless one is already there."""
    path = folder / "generation_config.json"
    if path.is_file():
        return
    gen = {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
