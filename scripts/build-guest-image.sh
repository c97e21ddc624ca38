#!/usr/bin/env bash
# `make guest-image`: build the reference guest image; see packaging/guest-image/.
exec "$(dirname "$0")/../packaging/guest-image/build.sh" "$@"
