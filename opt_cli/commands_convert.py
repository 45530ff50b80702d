"""`opt convert SRC DST --to FORMAT`: the command-line face of `conversion.convert`.

`conversion.convert` writes into a temporary folder beside DST (`opt_core.transaction`: a random
name and a marker file inside) and swaps it in at the end; an error or Ctrl-C removes it and leaves
DST as it was. A conversion killed outright leaves that folder behind; the next `opt convert` to the
same DST removes it (or finishes the swap, if it had begun) and says so. `--overwrite` replaces a DST
that holds only what an earlier write listed in its `.opt-manifest.json` (or a plain model folder)
and refuses anything else, deleting nothing.
"""

from __future__ import annotations

import argparse

from opt_cli.errors import InputError, UsageError
from opt_cli.paths import BUNDLED, bundled_folder, hub_folder, output_folder, settle_output
from opt_cli.registry import register

FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")


@register("convert", "Convert an OPT checkpoint (HF safetensors/bin/tf-h5/flax-msgpack or metaseq) to another format")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("src", help="input: a Hugging Face model folder, a weights file, a metaseq folder/file, "
                   "or 'bundled'")
    p.add_argument("dst", help="output folder (new or empty, unless --overwrite)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--from", dest="src_format", choices=(*FORMATS, "metaseq"), default=None,
                   help="read SRC as this format (default: detected; safetensors first when a folder has several)")
    p.add_argument("--dtype", default=None, help="cast every tensor: fp32, fp16 or bf16 (default: keep)")
    p.add_argument("--shard-size", default=None,
                   help="max shard size for safetensors/bin, e.g. 2GB or 500MB (default 5GB, as Hugging Face)")
    p.add_argument("--config", default=None, help="config.json (or its folder) to use instead of the source's")
    p.add_argument("--verify", action="store_true", help="re-read the output and compare every tensor with the source")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model an earlier write left in DST (listed in its .opt-manifest.json; a plain "
                        "model folder too); a DST holding anything else is refused")
    p.add_argument("--merge-adapter", metavar="DIR", default=None,
                   help="merge a LoRA adapter folder (PEFT's files) into the converted weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-non-finite", action="store_true", help="convert NaN/inf weights instead of refusing them")

    def run(args: argparse.Namespace) -> int:
        from conversion import convert
        from opt_core.checkpoint import CheckpointError
        from opt_core.transaction import OutputError

        src = bundled_folder() if args.src == BUNDLED else hub_folder(args.src, "SRC")
        if not src.exists():
            raise UsageError(f"SRC {src} does not exist; expected a model folder, a weights file, a metaseq "
                             "checkpoint, or 'bundled'")
        settle_output(args.dst)
        dst = output_folder(args.dst, args.overwrite, what="DST")
        try:
            report = convert(
                src, dst, to=args.to, dtype=args.dtype, shard_size=args.shard_size, config=args.config,
                overwrite=args.overwrite, verify=args.verify, progress=not args.no_progress,
                src_format=args.src_format, allow_non_finite=args.allow_non_finite,
                adapter=args.merge_adapter,
            )
        except (FileExistsError, OutputError) as e:  # DST refused, or changed while converting
            raise UsageError(str(e)) from None
        except CheckpointError as e:
            raise InputError(str(e)) from None
        except OSError as e:  # permissions, disk full: one line, not a traceback
            raise InputError(f"{type(e).__name__}: {e}") from None
        print(report.summary())
        return 0

    return run
