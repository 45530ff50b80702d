"""`opt verify`: cross-framework equivalence report for one checkpoint (see `opt_verify`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opt_cli.backends import adapters
from opt_cli.errors import UsageError
from opt_cli.options import add_backends_argument, int_in
from opt_cli.paths import input_file, model_folder, report_file, tokenizer_folder
from opt_cli.registry import register

DTYPES = ("float32", "float16", "bfloat16", "float64")


def read_prompts(path: Path) -> tuple[list[str] | None, list[list[int]] | None]:
    """Prompts from a file: one text per line, or a JSON list of texts or of token-id lists."""
    input_file(path, "prompts file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json":
        from opt_core.safe_files import parse_json

        data = parse_json(text.encode("utf-8"), f"prompts file {path}", UsageError)
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
    p.add_argument("model_dir", metavar="MODEL", help="model folder (Hugging Face layout), or 'bundled'")
    add_backends_argument(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="backends' compute dtype")
    p.add_argument("--quantize", default=None, choices=("int8", "int4", "w8a8"),
                   help="load the backends quantized and report their error against the float reference")
    p.add_argument("--adapter", metavar="DIR", type=Path,
                   help="a LoRA adapter folder (PEFT's files) applied in every backend (merged into the reference)")
    p.add_argument("--prompts", metavar="FILE", help="file: one prompt per line, or JSON texts / token-id lists")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (or 'bundled') when MODEL has none")
    p.add_argument("--new-tokens", type=int_in(0), default=16, metavar="N", help="greedy tokens to compare")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", dest="reference", action="store_const", const=True, default="auto",
                     help="always include the float64 reference (default: only up to 400M parameters)")
    ref.add_argument("--no-reference", dest="reference", action="store_const", const=False,
                     help="leave the float64 reference out")
    p.add_argument("--allow-missing", action="store_true",
                   help="report backends that are not installed without failing")
    p.add_argument("--json", type=Path, metavar="OUT",
                   help="also write the report as JSON (an existing OUT is refused unless --force)")
    p.add_argument("--markdown", type=Path, metavar="OUT",
                   help="also write the report as Markdown (an existing OUT is refused unless --force)")
    p.add_argument("--force", action="store_true",
                   help="let --json / --markdown replace an existing file (never a folder, a special file "
                        "or an input)")
    p.add_argument("--quiet-progress", action="store_true", help="no per-backend progress lines on stderr")

    def run(args: argparse.Namespace) -> int:
        chosen = adapters(args.backends)
        folder = model_folder(args.model_dir, what="MODEL")
        tokenizer = tokenizer_folder(args.tokenizer) if args.tokenizer else None
        prompts, ids = read_prompts(Path(args.prompts)) if args.prompts else (None, None)
        # the report files are checked before any work, and may never be an input (config.json...)
        inputs = [p for p in (folder, tokenizer, args.prompts) if p is not None]
        json_out = report_file(args.json, args.force, "--json", inputs)
        markdown_out = report_file(args.markdown, args.force, "--markdown", inputs)
        if json_out is not None and markdown_out is not None and json_out.resolve() == markdown_out.resolve():
            raise UsageError(f"--json and --markdown name the same file {json_out}")

        def progress(line: str) -> None:
            if not args.quiet_progress:
                print(f"verify: {line}", file=sys.stderr, flush=True)

        for backend in chosen:  # import each framework up front, its start-up chatter filtered
            try:
                backend.module()
            except UsageError:
                pass  # verify reports a missing backend itself
        from opt_core.transaction import write_report_file
        from opt_verify import VerifyError, format_table, to_markdown, verify

        try:
            report = verify(
                folder, backends=[b.name for b in chosen], dtype=args.dtype, prompts=prompts, input_ids=ids,
                new_tokens=args.new_tokens, reference=args.reference, tokenizer_dir=tokenizer,
                allow_missing=args.allow_missing, progress=progress, quantize=args.quantize,
                adapter=args.adapter,
            )
        except VerifyError as e:
            raise UsageError(str(e)) from None
        print(format_table(report))
        if json_out is not None:
            print(f"JSON report: {write_report_file(json_out, report.to_json() + chr(10))}")
        if markdown_out is not None:
            print(f"Markdown report: {write_report_file(markdown_out, to_markdown(report))}")
        return 0 if report.passed else 1

    return run
