#!/bin/bash
# Submit an sbatch script from the repository root, creating logs/ first: Slurm opens the
# --output=logs/... file before the script runs, and fails the job when the directory is missing.
# Usage: examples/slurm/submit.sh examples/slurm/<script>.sbatch [sbatch options / script arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p logs
exec sbatch "$@"
