"""What `quantize="int8"` and `"w8a8"` cost in accuracy in each backend, on the bundled model.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_w8a8.py [--backends torch,tf,flax] [--markdown OUT]

The three backends implement w8a8 differently (opt_core.quantization.W8A8 says how, README.md
"quantize= in each backend" why); this measures what that difference does. For each backend:
perplexity of fp32, int8 and w8a8 on the first 2,048 tokens of the held-out Shakespeare (the last
10% of data/corpus/tinyshakespeare.txt, windows of 256: the protocol of the torch accuracy guard in
tests/torch/test_quantize.py), and the largest relative logit error of int8 and w8a8 against the
same backend's fp32 on a left-padded batch (real tokens only).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL_TOKENS = 2048
WINDOW = 256


def held_out_ids() -> np.ndarray:
    from opt_core import OPTTokenizer, bundled
    from opt_core.data import read_text, split_text

    _train, held_out = split_text(read_text(ROOT / "data" / "corpus" / "tinyshakespeare.txt"), 0.1)
    tokenizer = OPTTokenizer.from_pretrained(bundled.path())
    return np.asarray(tokenizer.encode(held_out[:8_000]), dtype=np.int64)[:EVAL_TOKENS]


def logits_error(backend, model, reference: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    got = backend.to_numpy(model(input_ids=ids, attention_mask=mask).logits).astype(np.float64)
    real = mask.astype(bool)
    return float(np.abs(got - reference)[real].max() / np.abs(reference[real]).max())


def measure(name: str, ids: np.ndarray) -> dict[str, float]:
    from opt_cli.backends import adapter
    from opt_cli.commands_eval import perplexity_of_ids
    from opt_core import bundled

    backend = adapter(name)
    backend.module()
    rng = np.random.default_rng(0)
    batch = rng.integers(4, 4096, (4, 24))
    mask = np.ones_like(batch)
    mask[1, :5] = 0
    mask[3, :11] = 0  # left padding
    row = {}
    reference = None
    for mode in (None, "int8", "w8a8"):
        model = backend.load(bundled.path(), quantize=mode)
        row[f"ppl {mode or 'fp32'}"] = perplexity_of_ids(backend, model, ids, WINDOW, WINDOW, progress=False)[
            "perplexity"]
        if mode is None:
            reference = backend.to_numpy(model(input_ids=batch, attention_mask=mask).logits).astype(np.float64)
        else:
            row[f"logit err {mode}"] = logits_error(backend, model, reference, batch, mask)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,tf,flax")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ids = held_out_ids()
    rows = {name: measure(name, ids) for name in args.backends.split(",")}
    cols = ["ppl fp32", "ppl int8", "ppl w8a8", "logit err int8", "logit err w8a8"]
    lines = ["| backend | " + " | ".join(cols) + " |", "|---|" + "--:|" * len(cols)]
    for name, row in rows.items():
        lines.append(f"| opt_{name} | " + " | ".join(
            f"{row[c]:.3f}" if c.startswith("ppl") else f"{row[c]:.4f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
