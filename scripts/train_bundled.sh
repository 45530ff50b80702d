#!/usr/bin/env bash
# Retrain the bundled model (opt_core/bundled/opt-shakespeare) from scratch with this project's own
# training code: a byte-level BPE tokenizer and a 4.3M-parameter OPT on tinyshakespeare, the last 10%
# of the text held out for validation. About 5 minutes on 2 idle CPU cores (66 minutes on 2 cores
# shared with five other jobs).
#
#   scripts/train_bundled.sh [CORPUS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS="${1:-data/corpus/tinyshakespeare.txt}"
OUT="${2:-opt_core/bundled/opt-shakespeare}"
# `opt train` writes only into a new or empty folder; OUT keeps its model card (README.md) and its
# generation_config.json, everything else is replaced by the fresh run's files.
RUN="$(mktemp -d)/run"
.venv/bin/opt train --corpus "$CORPUS" --out "$RUN" \
    --vocab-size 4096 --hidden-size 256 --layers 4 --heads 4 --ffn-dim 1024 --context 256 --dropout 0.1 \
    --steps 450 --batch-size 8 --lr 2e-3 --warmup 40 --min-lr-ratio 0.1 --weight-decay 0.1 \
    --validation-fraction 0.1 --eval-every 150 --seed 0 --threads 2
mkdir -p "$OUT"
for f in "$RUN"/*; do
    name="$(basename "$f")"
    if [ "$name" = generation_config.json ] && [ -f "$OUT/$name" ]; then continue; fi
    cp -r "$f" "$OUT/"
done
rm -rf "$(dirname "$RUN")"
echo "copied the run into $OUT"
