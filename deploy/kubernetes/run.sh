#!/usr/bin/env bash
# Runs a sharded recfuse run on a Kubernetes cluster, step by step (docs/scale-out.md):
#   volume + config → fetch data → fuse shards → prepare → evaluate shards → merge.
# Each step is a Job; the next is applied only when the previous one completed. A step that
# failed stops the script: fix the cause, delete that Job, and rerun this script: finished
# Jobs are kept (and skipped), and a shard resumes from its journal on the volume.
# Usage: deploy/kubernetes/run.sh [kubectl flags, e.g. -n recsys]
set -euo pipefail
cd "$(dirname "$0")"
k() { kubectl "$@"; }
FLAGS=("$@")

# Waits until Job $1 is Complete (returns 0) or Failed (returns 1).
wait_job() {
    local job=$1 state
    while true; do
        state=$(k get job "$job" "${FLAGS[@]}" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
        case " $state " in
            *" Complete "*) echo "job/$job complete"; return 0 ;;
            *" Failed "*) echo "job/$job failed: kubectl logs -l job-name=$job ${FLAGS[*]}" >&2; return 1 ;;
        esac
        sleep 10
    done
}

step() {
    local file=$1 job=$2
    k apply -f "$file" "${FLAGS[@]}"
    wait_job "$job"
}

k apply -f volume.yaml -f config.yaml "${FLAGS[@]}"
step fetch-data.yaml recfuse-fetch-data
step fuse-shards.yaml recfuse-fuse
step prepare.yaml recfuse-prepare
step evaluate-shards.yaml recfuse-evaluate
step merge.yaml recfuse-merge
echo "report: kubectl logs job/recfuse-merge ${FLAGS[*]} (runs/quickstart/report.md on the volume)"
