#!/usr/bin/env bash
# Build the coco-shim reference guest initramfs (cached under $COCO_CACHE/guest/<key>/).
# The last line printed is the image's sha256. Needs root (mmdebstrap, chroot).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
COCO_CACHE=${COCO_CACHE:-/var/cache/coco-shim}
export COCO_CACHE
cd "$REPO"
exec "$COCO_CACHE/venv/bin/python" -m guest.image "$@"
