"""One implementation's greedy decode speed in this tree, for comparing two checkouts process by process.

    cd TREE && PYTHONPATH=$PWD .venv/bin/python /path/to/ab_worker.py opt_torch     # prints one JSON line

Loads the opt-125m-shaped random checkpoint through the tree's own benchmark runners (`runners.LOADERS`;
trees from before the benchmarks were split keep them in `run_all`), warms up at each batch size, then
prints the best of 3 `generate` calls (prompt 32, 64 new tokens, 2 threads) at batch 1 and 8. Run it
alternately in the two trees (before, after, before, after, ...) so that machine drift lands on both;
BENCHMARKS.md's before/after decode-speed section was measured this way.
"""

import json
import os
import sys
import time

R = os.getcwd()
sys.path.insert(0, R)
sys.path.insert(0, os.path.join(R, "benchmarks"))
impl = sys.argv[1]
try:
    import common
    import runners

    folder, prompt, loaders = common.write_checkpoint("opt-125m"), common.prompt, runners.LOADERS
except (ImportError, AttributeError):
    import run_all

    folder, prompt, loaders = run_all.write_checkpoint("opt-125m"), run_all._prompt, run_all.LOADERS
runner = loaders[impl](str(folder), 2)
best = {}
for b in (1, 8):
    ids, mask = prompt(b, 32, seed=1)
    runner.generate(ids, mask, 4)
    for _ in range(3):
        t = time.perf_counter()
        n = runner.generate(ids, mask, 64)
        best[b] = max(best.get(b, 0.0), b * n / (time.perf_counter() - t))
print(json.dumps({"impl": impl, "tree": os.path.basename(R), **{f"b{k}": round(v, 1) for k, v in best.items()}}))
