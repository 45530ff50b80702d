"""`opt train`: train (or fine-tune) a causal-LM OPT on a text file in one command.

    opt train --corpus tinyshakespeare.txt --out my-model                 # tokenizer + model from scratch
    opt train --corpus more.txt --init bundled --out tuned --steps 100    # fine-tune an existing model

The last `--validation-fraction` of the text is held out and reported as perplexity. The output
folder is a Hugging Face-layout model folder (config, weights, tokenizer, generation config) plus
`training_args.json` and `trainer_log.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from opt_cli.backends import (
    check_backend,
    import_backend,
    load_causal_lm,
    load_tokenizer,
    new_causal_lm,
    resolve_model_dir,
    set_threads,
)
from opt_cli.main import UsageError, register


def add_model_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a new model (ignored with --init)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary of a newly trained tokenizer")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--ffn-dim", type=int, default=1024)
    g.add_argument("--context", type=int, default=256, help="max_position_embeddings")
    g.add_argument("--dropout", type=float, default=0.1)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (opt_core.training_args.TrainingArguments)")
    g.add_argument("--steps", type=int, default=400, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per row (default: the model's context)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=40, help="linear warm-up steps")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--validation-fraction", type=float, default=0.1, help="held-out tail of the text")
    g.add_argument("--eval-every", type=int, default=100,
                   help="steps between validation passes (0: end only)")
    g.add_argument("--eval-batches", type=int, default=None, help="validation batches per pass (default all)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (torch) / compute (flax, tf)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")


@register("train", "Train or fine-tune a causal-LM OPT on a text file (tokenizer too, when new)")
def _train(p: argparse.ArgumentParser):
    p.add_argument("--corpus", required=True, help="UTF-8 text file to train on")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--backend", default="torch", help="torch | tf | flax (default torch)")
    p.add_argument("--init", default=None,
                   help="model folder (or 'bundled') to fine-tune instead of a new model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for a new model (default: train a BPE)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the framework's)")
    add_model_shape_arguments(p)
    add_training_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from opt_core import OPTConfig
        from opt_core.data import load_text_datasets, read_text, split_text, train_tokenizer
        from opt_core.training_args import TrainingArguments

        backend = check_backend(args.backend)
        read_text(args.corpus)  # clear errors for a missing or empty corpus before any heavy import
        out = Path(args.out)
        init = resolve_model_dir(args.init) if args.init else None
        if init is not None:
            tokenizer = load_tokenizer(init)
            config = OPTConfig.from_pretrained(init)
        else:
            if args.tokenizer:
                tokenizer = load_tokenizer(Path(args.tokenizer))
            else:
                train_text, _ = split_text(read_text(args.corpus), args.validation_fraction)
                print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on the training split")
                tokenizer = train_tokenizer(train_text, vocab_size=args.vocab_size)
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
        targs = TrainingArguments(
            max_steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            block_size=block, learning_rate=args.lr, min_lr_ratio=args.min_lr_ratio,
            warmup_steps=min(args.warmup, args.steps), lr_schedule=args.schedule,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None, seed=args.seed,
            validation_fraction=args.validation_fraction, eval_every=args.eval_every,
            eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
            output_dir=str(out), bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        )
        train, val = load_text_datasets(args.corpus, tokenizer, block, args.validation_fraction)
        print(f"data: {args.corpus}: {train.num_tokens:,} training tokens in {len(train)} blocks of {block}, "
              f"{val.num_tokens:,} validation tokens ({len(val)} blocks)")
        if args.threads:
            set_threads(backend, args.threads)
        model = load_causal_lm(backend, init) if init else new_causal_lm(backend, config, seed=args.seed)
        from opt_core.params import parameter_count

        print(f"model: {parameter_count(config):,} parameters, {config.num_hidden_layers} layers x "
              f"{config.hidden_size} wide, context {config.max_position_embeddings}; backend {backend}")
        training = import_backend(backend, "training")
        t0 = time.perf_counter()
        result = training.train_causal_lm(model, train, targs, eval_data=val if len(val) else None,
                                          tokenizer=tokenizer, log=lambda line: print(line, flush=True))
        write_generation_config(out, config)
        summary: dict[str, Any] = {
            "command": "opt " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name == "opt" else None,
            "arguments": {k: v for k, v in vars(args).items() if k != "handler"},
            "backend": backend,
            "parameters": parameter_count(config),
            "steps": result.steps,
            "tokens_seen": result.tokens,
            "final_train_loss": result.losses[-1],
            "mean_train_loss_last_10": sum(result.losses[-10:]) / len(result.losses[-10:]),
            "validation": result.evals[-1] if result.evals else None,
            "seconds": time.perf_counter() - t0,
        }
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        val_text = f", validation perplexity {result.evals[-1]['perplexity']:.2f}" if result.evals else ""
        print(f"saved {out}: {result.steps} steps in {summary['seconds']:.0f} s, final train loss "
              f"{result.losses[-1]:.4f}{val_text}")
        return 0

    return run


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
