#!/usr/bin/env bash
# Build the GRPO and SFT parquet files: bash training/scripts/build_data.sh INPUT.json [options]
# Defaults follow the paper: 500 BM25 hard negatives, promotion at 0.6, 32K-token cap with the
# target model's tokenizer (TOKENIZER: a local Hugging Face tokenizer directory).
set -euo pipefail
INPUT="${1:?usage: build_data.sh INPUT.json [more training.data options]}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
TOKENIZER_ARGS=()
if [[ -n "${TOKENIZER:-}" ]]; then TOKENIZER_ARGS=(--tokenizer "$TOKENIZER"); fi
exec python3 -m training.data --input "$INPUT" --output "${LCKV_DATA_DIR:-$REPO/data/lckv}" \
    --num-negatives 500 --promote-threshold 0.6 --max-tokens 32768 --val-fraction 0.05 \
    "${TOKENIZER_ARGS[@]}" "$@"
