#!/bin/bash
# Submit an sbatch script from the repository root, creating logs/ first: Slurm opens the
# --output=logs/... file before the script runs, and fails the job when the directory is missing.
# Usage: examples/slurm/submit.sh [sbatch options] examples/slurm/<script>.sbatch [script arguments]
# e.g. RL after its model's cold-start SFT:
#   SFT=$(examples/slurm/submit.sh --parsable examples/slurm/sft_qwen2_5_vl_3b.sbatch)
#   examples/slurm/submit.sh --dependency=afterok:$SFT examples/slurm/care_qwen2_5_vl_3b.sbatch
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p logs
exec sbatch "$@"
