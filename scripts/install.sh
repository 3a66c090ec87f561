#!/usr/bin/env bash
# Install everything nydus-actors needs on a Debian machine (run as root):
# system packages (libfuse3 to build pyfuse3, fuse3 for fusermount3), a virtual
# environment in .venv, and the package itself. `--test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev)
if [ "${1:-}" = "--test" ]; then
  # image tools the tests compare against: mkfs/fsck/dump.erofs, mksquashfs, squashfuse
  packages+=(erofs-utils squashfs-tools squashfuse)
  # storage servers the backend tests run on 127.0.0.1: OCI registry, htpasswd, nginx
  packages+=(docker-registry apache2-utils nginx-light openssl)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
