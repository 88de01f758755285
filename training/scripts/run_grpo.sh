#!/usr/bin/env bash
# GRPO on a GPU node: bash training/scripts/run_grpo.sh REWARD [hydra overrides...]
#   REWARD: ao | id | id_c | id_q | r_judge | lckv  (configs/grpo_<REWARD>.yaml)
# Environment: LCKV_DATA_DIR (parquet from `python -m training.data`, default data/lckv),
# LCKV_MODEL (default Qwen/Qwen2.5-7B-Instruct-1M); for r_judge LCKV_JUDGE_URL/_MODEL/_API_KEY;
# for lckv LCKV_TRAIN_POLICY and LCKV_TRAIN_POLICY_SETTINGS.
set -euo pipefail
REWARD="${1:?usage: run_grpo.sh REWARD [hydra overrides...] with REWARD in ao id id_c id_q r_judge lckv}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONFIG_DIR="$REPO/training/configs"
if [[ ! -f "$CONFIG_DIR/grpo_${REWARD}.yaml" ]]; then
    echo "unknown reward '$REWARD': no $CONFIG_DIR/grpo_${REWARD}.yaml" >&2
    exit 2
fi
# training.rewards (pkg://) and training.lckv_backend (external_lib) import from the repo root;
# Ray workers on this node inherit the variable.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export LCKV_DATA_DIR="${LCKV_DATA_DIR:-$REPO/data/lckv}"
cd "$REPO"
exec python3 -m verl.trainer.main_ppo --config-path="$CONFIG_DIR" --config-name="grpo_${REWARD}" "$@"
