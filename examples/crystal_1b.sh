#!/usr/bin/env bash
#SBATCH --job-name=crystal-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=crystal-1b-%j.out
# The Crystal recipe at a quarter of the width (crystal-1b), for small clusters: TP 1, PP 1, all DP.
#   sbatch examples/crystal_1b.sh        DRY_RUN=1 bash examples/crystal_1b.sh
set -euo pipefail
MODEL=${MODEL:-crystal-1b}
CKPT_DIR=${CKPT_DIR:-checkpoints/crystal-1b}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
# shellcheck source=examples/slurm/launch.sh
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/examples/slurm/launch.sh"
