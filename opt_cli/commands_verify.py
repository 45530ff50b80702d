"""`opt verify`: cross-framework equivalence report for one checkpoint (see `opt_verify`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opt_cli.main import UsageError, register

DTYPES = ("float32", "float16", "bfloat16", "float64")


def read_prompts(path: Path) -> tuple[list[str] | None, list[list[int]] | None]:
    """Prompts from a file: one text per line, or a JSON list of texts or of token-id lists."""
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
            return data, None
        if isinstance(data, list) and data and all(
            isinstance(r, list) and r and all(isinstance(i, int) for i in r) for r in data
        ):
            return None, data
        raise UsageError(f"{path} must hold a JSON list of strings or a list of token-id lists")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} has no non-empty line")
    return prompts, None


@register("verify", "Check that the backends (and the float64 reference) compute the same model")
def _verify(p: argparse.ArgumentParser):
    p.add_argument("model_dir", type=Path, help="Hugging Face-layout OPT folder")
    p.add_argument("--backends", default="torch,tf,flax", help="comma-separated (default: torch,tf,flax)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="backends' compute dtype")
    p.add_argument("--prompts", type=Path, help="file: one prompt per line, or JSON texts / token-id lists")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder when MODEL_DIR has none")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to compare (default 16)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", dest="reference", action="store_const", const=True, default="auto",
                     help="always include the float64 reference (default: only up to 400M parameters)")
    ref.add_argument("--no-reference", dest="reference", action="store_const", const=False,
                     help="leave the float64 reference out")
    p.add_argument("--allow-missing", action="store_true",
                   help="report backends that are not installed without failing")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    p.add_argument("--markdown", type=Path, metavar="OUT", help="also write the report as Markdown")

    def run(args: argparse.Namespace) -> int:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
        from opt_verify import VerifyError, format_table, verify, write_json, write_markdown
        from opt_verify.verify import BACKENDS

        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(BACKENDS)}")
        from opt_core.hub import is_hub_id, resolve_pretrained

        if is_hub_id(str(args.model_dir)):  # a Hugging Face Hub id
            args.model_dir = resolve_pretrained(str(args.model_dir))
        if not args.model_dir.is_dir():
            raise UsageError(f"model folder {args.model_dir} does not exist")
        prompts, ids = read_prompts(args.prompts) if args.prompts else (None, None)
        try:
            report = verify(
                args.model_dir, backends=backends, dtype=args.dtype, prompts=prompts, input_ids=ids,
                new_tokens=args.new_tokens, reference=args.reference, tokenizer_dir=args.tokenizer,
                allow_missing=args.allow_missing,
            )
        except VerifyError as e:
            raise UsageError(str(e)) from None
        print(format_table(report))
        if args.json:
            print(f"JSON report: {write_json(report, args.json)}")
        if args.markdown:
            print(f"Markdown report: {write_markdown(report, args.markdown)}")
        return 0 if report.passed else 1

    return run
