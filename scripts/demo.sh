#!/usr/bin/env bash
# Install nydus-actors and serve the sample tree of config/sample-tree read-only
# at /mnt/nydus-actors, with the API socket at /run/nydus-actors/api.sock.
# Ctrl-C unmounts and exits. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p /mnt/nydus-actors /run/nydus-actors
echo "serving config/sample-tree at /mnt/nydus-actors (API: /run/nydus-actors/api.sock); Ctrl-C to stop"
exec .venv/bin/nydus-actors \
  --shared-dir config/sample-tree \
  --mountpoint /mnt/nydus-actors \
  --apisock /run/nydus-actors/api.sock \
  --log-level info
