#!/usr/bin/env bash
# Get the llama.cpp peer of bench/peers/llamacpp.py, outside the repository (CI never runs this).
#
#   bash bench/peers/build_llamacpp.sh /work/peer-bin     # ~7 min of 2 cores
#
# Downloads the llama-cpp-python sdist from PyPI (it vendors a pinned llama.cpp tree, with the
# GGUF converters and gguf-py), then builds only the `llama-server` target with cmake (Release,
# no curl, no web UI download, -march=native) inside that tree. Leaves:
#   DEST/llama.cpp/                 the vendored source (convert_hf_to_gguf.py, convert_lora_to_gguf.py)
#   DEST/llama.cpp/build/bin/       llama-server and its shared libraries
#   DEST/llama-server               a symlink to it (pass it as --llama-server)
set -euo pipefail
DEST=${1:?usage: build_llamacpp.sh DEST [llama-cpp-python version]}
VERSION=${2:-0.3.36}
PIP=${PIP:-pip}
JOBS=${JOBS:-2}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if [ ! -f "$DEST/llama.cpp/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  rm -rf "$DEST/llama.cpp"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/llama.cpp"
  rm -rf "$tmp"
fi
cmake -S "$DEST/llama.cpp" -B "$DEST/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF
cmake --build "$DEST/llama.cpp/build" --target llama-server -j "$JOBS"
ln -sf "$DEST/llama.cpp/build/bin/llama-server" "$DEST/llama-server"
"$DEST/llama-server" --version
