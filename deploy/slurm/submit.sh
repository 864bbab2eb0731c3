#!/usr/bin/env bash
# Submits a sharded recfuse run to Slurm as four dependent jobs (docs/scale-out.md):
#   fuse array (N tasks) → prepare → evaluate array (N tasks) → merge
# Run it from the directory the config's relative paths start from, on a filesystem every
# node shares. Each job starts only if the one before succeeded (afterok); if a task failed,
# the later jobs are left pending with "DependencyNeverSatisfied": resubmit the failed task
# (`sbatch --array=<i> deploy/slurm/shard.sbatch CONFIG`), it resumes from its journal, then
# submit the rest again.
# Usage: deploy/slurm/submit.sh SHARDS RUN_DIR CONFIG [--overlay FILE ...] [--set KEY=VALUE ...]
#   RECFUSE=/path/to/recfuse (default: recfuse on PATH) is passed to every job.
set -euo pipefail
here=$(dirname "$0")
[ $# -ge 3 ] || { sed -n 2,12p "$0" >&2; exit 2; }
n=$1 run_dir=$2
shift 2
last=$((n - 1))
export RECFUSE="${RECFUSE:-recfuse}"
fuse=$(sbatch --parsable --export=ALL --array="0-$last" "$here/shard.sbatch" "$@")
prepare=$(sbatch --parsable --export=ALL --dependency="afterok:$fuse" "$here/prepare.sbatch" "$@")
evaluate=$(sbatch --parsable --export=ALL --dependency="afterok:$prepare" --array="0-$last" "$here/shard.sbatch" "$@")
merge=$(sbatch --parsable --export=ALL --dependency="afterok:$evaluate" "$here/merge.sbatch" "$run_dir")
echo "submitted: fuse $fuse, prepare $prepare, evaluate $evaluate, merge $merge"
echo "report: $run_dir/report.md once job $merge has finished"
