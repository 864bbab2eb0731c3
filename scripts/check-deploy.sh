#!/usr/bin/env bash
# Checks the deployment files (deploy/, docs/scale-out.md) the way a cluster would use them:
# 1. the Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate from
#    PyPI, strict: unknown fields are errors), for the oldest version we support (1.31:
#    backoffLimitPerIndex) and the newest;
# 2. what the schemas cannot see: the Indexed Jobs' completions = parallelism = run.shards of
#    the ConfigMap's overlay, and that overlay on configs/quickstart.toml passes `recfuse validate`;
# 3. the Slurm scripts end to end: submit.sh with an `sbatch` stand-in that runs each job at
#    once (array tasks one by one, with Slurm's array variables), on a small pipeline, must
#    leave a merged report.
# Usage: scripts/check-deploy.sh [path/to/recfuse] (default: target/debug/recfuse)
set -euo pipefail
cd "$(dirname "$0")/.."
RECFUSE=$(realpath "${1:-target/debug/recfuse}")
venv=.cache/venv-deploy
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0
fi
for version in 1.31 1.37; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" deploy/kubernetes/*.yaml
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$venv/bin/python" - "$tmp/cluster.toml" <<'PY'
import sys, tomllib, yaml, glob
overlay = yaml.safe_load(open("deploy/kubernetes/config.yaml"))["data"]["cluster.toml"]
open(sys.argv[1], "w").write(overlay)
shards = tomllib.loads(overlay)["run"]["shards"]
for path in glob.glob("deploy/kubernetes/*.yaml"):
    for doc in yaml.safe_load_all(open(path)):
        if doc["kind"] == "Job" and doc["spec"].get("completionMode") == "Indexed":
            spec = doc["spec"]
            assert spec["completions"] == spec["parallelism"] == shards, f"{path}: completions and parallelism must equal run.shards = {shards}"
            assert "--shard" in doc["spec"]["template"]["spec"]["containers"][0]["args"], f"{path}: an Indexed Job runs shards"
print(f"kubernetes: manifests valid, Indexed Jobs of {shards} shards")
PY
"$RECFUSE" validate configs/quickstart.toml --overlay "$tmp/cluster.toml" > /dev/null

# Slurm: a stand-in for sbatch that runs the job right away (in submission order, which
# respects submit.sh's afterok chain) and fails the submission if the job fails.
mkdir -p "$tmp/bin"
cat > "$tmp/bin/sbatch" <<'SH'
#!/usr/bin/env bash
set -euo pipefail
array=""
while [[ $1 == --* ]]; do
    case $1 in --array=*) array=${1#--array=} ;; esac
    shift
done
script=$1; shift
id=$(( $(cat "$SBATCH_IDS" 2>/dev/null || echo 100) + 1 )); echo $id > "$SBATCH_IDS"
if [ -n "$array" ]; then
    lo=${array%-*} hi=${array#*-}
    for ((i = lo; i <= hi; i++)); do
        SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_MIN=$lo SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) \
            bash "$script" "$@" >> "$SBATCH_LOG" 2>&1
    done
else
    bash "$script" "$@" >> "$SBATCH_LOG" 2>&1
fi
echo $id
SH
chmod +x "$tmp/bin/sbatch"
cat > "$tmp/slurm.toml" <<TOML
[run]
name = "slurm"
dir = "$tmp/runs"
sample_users = 60
[source]
kind = "recbole-atomic"
dir = "$PWD/.cache/data/ml-100k"
name = "ml-100k"
[[fusers]]
kind = "template"
[instructions]
kind = "ctr"
[tuner]
kind = "identity"
[[rankers]]
kind = "popularity"
[[rankers]]
kind = "bpr"
dim = 8
epochs = 2
TOML
if ! PATH="$tmp/bin:$PATH" RECFUSE="$RECFUSE" SBATCH_IDS="$tmp/ids" SBATCH_LOG="$tmp/slurm.log" \
    deploy/slurm/submit.sh 3 "$tmp/runs/slurm" "$tmp/slurm.toml" > "$tmp/submit.out"; then
    cat "$tmp/slurm.log" >&2
    exit 1
fi
for i in 0 1 2; do
    [ -f "$tmp/runs/slurm/shards/$i-of-3/reports/bpr.outcomes.jsonl" ] || { echo "slurm: shard $i/3 did not evaluate" >&2; exit 1; }
done
grep -q "^| bpr |" "$tmp/runs/slurm/report.md" || { echo "slurm: no merged report" >&2; cat "$tmp/slurm.log" >&2; exit 1; }
echo "slurm: submit.sh ran fuse (3 tasks), prepare, evaluate (3 tasks) and merge"
