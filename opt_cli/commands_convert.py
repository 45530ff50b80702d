"""`opt convert SRC DST --to FORMAT`: the command-line face of `conversion.convert`."""

from __future__ import annotations

import argparse

from opt_cli.main import UsageError, register

FORMATS = ("safetensors", "bin", "tf-h5", "flax-msgpack")


@register("convert", "Convert an OPT checkpoint (HF safetensors/bin/tf-h5/flax-msgpack or metaseq) to another format")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("src", help="input: a Hugging Face model folder, a weights file, or a metaseq folder/file")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--from", dest="src_format", choices=(*FORMATS, "metaseq"), default=None,
                   help="read SRC as this format (default: detected; safetensors first when a folder has several)")
    p.add_argument("--dtype", default=None, help="cast every tensor: fp32, fp16 or bf16 (default: keep)")
    p.add_argument("--shard-size", default=None,
                   help="max shard size for safetensors/bin, e.g. 2GB or 500MB (default 5GB, as Hugging Face)")
    p.add_argument("--config", default=None, help="config.json (or its folder) to use instead of the source's")
    p.add_argument("--verify", action="store_true", help="re-read the output and compare every tensor with the source")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-non-finite", action="store_true", help="convert NaN/inf weights instead of refusing them")

    def run(args: argparse.Namespace) -> int:
        from conversion import convert
        from opt_core.checkpoint import CheckpointError
        from opt_core.hub import resolve_pretrained

        try:
            report = convert(
                resolve_pretrained(args.src), args.dst, to=args.to, dtype=args.dtype, shard_size=args.shard_size,
                config=args.config, overwrite=args.overwrite, verify=args.verify, progress=not args.no_progress,
                src_format=args.src_format, allow_non_finite=args.allow_non_finite,
            )
        except FileExistsError as e:
            raise UsageError(str(e)) from None
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        except OSError as e:  # permissions, disk full: one paragraph, not a traceback
            raise UsageError(f"{type(e).__name__}: {e}") from None
        print(report.summary())
        return 0

    return run
