#!/usr/bin/env bash
# Builds llama.cpp's command-line tools from the source vendored in the PyPI `llama-cpp-python`
# sdist (the only way to get llama.cpp through a registry here), for the local-generation
# benchmarks. Output: .cache/llama.cpp/build/bin/{llama-bench,llama-batched-bench,llama-server,...}.
# Takes ~10-15 min on 2 cores; reruns are no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$PWD/.cache
VERSION=0.3.36
OUT=$CACHE/llama.cpp
if [[ -x $OUT/build/bin/llama-batched-bench && -x $OUT/build/bin/llama-server ]]; then
    echo "llama.cpp: present in $OUT"; exit 0
fi
VENV=$CACHE/venv-llamacpp
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet cmake scikit-build-core
mkdir -p "$CACHE/pkgs"
SDIST=$CACHE/pkgs/llama_cpp_python-$VERSION.tar.gz
[[ -f $SDIST ]] || "$VENV/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
    --no-build-isolation "llama-cpp-python==$VERSION" -d "$CACHE/pkgs"
if [[ ! -f $OUT/CMakeLists.txt ]]; then
    rm -rf "$OUT" && mkdir -p "$OUT"
    tar -xzf "$SDIST" -C "$OUT" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
# llama-server serves its web UI from generated headers; LLAMA_OPENSSL off: loopback only.
"$VENV/bin/cmake" -S "$OUT" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
"$VENV/bin/cmake" --build "$OUT/build" -j2 --target llama-bench llama-batched-bench llama-simple llama-tokenize llama-server
echo "llama.cpp: built in $OUT/build/bin"
