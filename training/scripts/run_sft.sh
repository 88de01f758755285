#!/usr/bin/env bash
# SFT baseline on a GPU node: bash training/scripts/run_sft.sh [hydra overrides...]
# Environment: LCKV_DATA_DIR (default data/lckv), LCKV_MODEL, NPROC_PER_NODE (default 8).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export LCKV_DATA_DIR="${LCKV_DATA_DIR:-$REPO/data/lckv}"
cd "$REPO"
exec torchrun --standalone --nnodes=1 --nproc_per_node="${NPROC_PER_NODE:-8}" \
    -m verl.trainer.sft_trainer --config-path="$REPO/training/configs" --config-name=sft \
    trainer.n_gpus_per_node="${NPROC_PER_NODE:-8}" "$@"
