#!/usr/bin/env bash
#SBATCH --job-name=crystal-7b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=crystal-7b-%j.out
# LLM360 Crystal 7B, its three phases (examples/phases/crystal.yaml), on N nodes of 8 GPUs:
#   sbatch examples/crystal_7b.sh            (submit from the repository root)
#   DRY_RUN=1 NODES=4 bash examples/crystal_7b.sh   prints the commands
# TP is 2 because the FFN width 10922 = 2 x 43 x 127 allows only 1 or 2; PP 2; DP = the rest.
# Every value here and in examples/slurm/launch.sh can be set from the environment. A requeued job
# resumes from CKPT_DIR.
set -euo pipefail
MODEL=${MODEL:-crystal-7b}
CKPT_DIR=${CKPT_DIR:-checkpoints/crystal-7b}
TP=${TP:-2}
PP=${PP:-2}
MICRO_BATCH=${MICRO_BATCH:-1}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
# shellcheck source=examples/slurm/launch.sh
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/examples/slurm/launch.sh"
