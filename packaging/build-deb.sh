#!/bin/bash
# Build the meshd Debian package with dpkg-deb.
#
#   packaging/build-deb.sh [OUTDIR]          # default OUTDIR: dist/
#
# The package carries meshd and every Python dependency as wheels
# (/opt/meshd/wheels); its postinst makes a virtual environment at /opt/meshd/venv
# with the target's own python3 and installs from those wheels with --no-index, so
# installing needs no network and the venv always matches the installed Python.
# /usr/bin/meshd and /usr/bin/meshctl point into the venv; the unit goes to
# /lib/systemd/system/meshd.service; /etc/meshd.toml is a conffile; postinst
# creates the `meshd` system user and group. It depends on meshd-llama-cpp
# (packaging/build-llama-deb.sh: llama-server and ggml-rpc-server where meshd finds
# them), which the CUDA build meshd-llama-cpp-cuda provides as well.
#
# Environment: WHEELHOUSE=DIR reuses (and fills) a directory of dependency wheels
# between builds; PYTHON picks the interpreter that builds the wheels (its major.minor
# must match the target's python3, 3.11 for Debian bookworm).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
python=${PYTHON:-python3}

version=$(sed -n 's/^version *= *//p' "$src/setup.cfg" | head -1)
[ -n "$version" ] || { echo "build-deb: no version in setup.cfg" >&2; exit 1; }
arch=$(dpkg --print-architecture)
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ -f "$src/etc/meshd.toml" ] || { echo "build-deb: $src/etc/meshd.toml is missing" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/meshd_${version}_${arch}

# -- the wheels: meshd itself, and its dependencies (cached in WHEELHOUSE) -------
wheels=$pkg/opt/meshd/wheels
mkdir -p "$wheels"
house=${WHEELHOUSE:-$stage/wheelhouse}
mkdir -p "$house"
# build meshd from a copy of the tracked and untracked-but-not-ignored files, so a
# stray build/ or egg-info in the checkout cannot leak into the package
(cd "$src" && git ls-files -co --exclude-standard -z 2>/dev/null || find . -type f -print0) |
  (cd "$src" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | (mkdir -p "$stage/src" && cd "$stage/src" && tar -xf -)
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$stage/src"
# a meshd wheel left in the house by an earlier build has the same version and older
# requirements: pip would take its metadata ("already downloaded") and miss new dependencies
rm -f "$house"/meshd-*.whl
"$python" -m pip wheel --quiet --wheel-dir "$house" --find-links "$house" "$(ls "$wheels"/meshd-*.whl)"
find "$house" -name '*.whl' ! -name 'meshd-*' -exec cp {} "$wheels/" \;

# -- files ----------------------------------------------------------------------
install -D -m 0644 "$src/systemd/meshd.service" "$pkg/lib/systemd/system/meshd.service"
install -D -m 0644 "$src/etc/meshd.toml" "$pkg/etc/meshd.toml"
mkdir -p "$pkg/usr/bin" "$pkg/usr/share/doc/meshd"
ln -s /opt/meshd/venv/bin/meshd "$pkg/usr/bin/meshd"
ln -s /opt/meshd/venv/bin/meshctl "$pkg/usr/bin/meshctl"
[ -f "$src/README.md" ] && install -m 0644 "$src/README.md" "$pkg/usr/share/doc/meshd/README.md"
cat > "$pkg/usr/share/doc/meshd/copyright" <<EOF
meshd $version, MIT licence. The wheels under /opt/meshd/wheels carry their own licences.
EOF

# -- control ----------------------------------------------------------------------
mkdir -p "$pkg/DEBIAN"
size=$(du -sk "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<EOF
Package: meshd
Version: $version
Architecture: $arch
Maintainer: meshd developers <meshd@localhost>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< ${pyver%.*}.$((${pyver#*.} + 1))), python3-venv, passwd, procps, meshd-llama-cpp
Section: net
Priority: optional
Description: pool the GPUs of many machines into one mesh for LLM inference
 meshd runs llama.cpp's llama-server behind one OpenAI-compatible API on every
 node of a mesh and routes each request to whichever node serves its model.
 meshctl is the operator's command-line tool.
EOF
echo /etc/meshd.toml > "$pkg/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$here/debian/$script" "$pkg/DEBIAN/$script"
done

deb=$out/meshd_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
echo "$deb"
