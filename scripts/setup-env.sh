#!/usr/bin/env bash
# Idempotently install everything the tests and the demo need on a Debian 12 host, caching it
# outside the repository (default /var/cache/coco-shim, override with COCO_CACHE).
#
# Installs: bookworm packages (QEMU for TCG boots, runc, busybox, mmdebstrap, binutils to strip the guest image, ...), containerd
# 2.1.9 (sid) and 1.7.24 (trixie) unpacked into the cache (never installed system-wide),
# vhost-device-vsock (sid .deb, unpacked), the guest kernel (bookworm linux-image, unpacked),
# a QEMU 11.1 root made with mmdebstrap (sid) for TEE option validation, and a Python virtualenv
# with this project installed (editable). Writes $COCO_CACHE/env.sh describing all paths.
#
# Every step prints what it does and how long it took; a second run with a warm cache finishes
# in seconds.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${COCO_CACHE:-/var/cache/coco-shim}
PY=${PYTHON:-python3}
CONTAINERD2_VERSION=2.1.9
CONTAINERD17_VERSION=1.7.24
mkdir -p "$CACHE"
exec 9>"$CACHE/.setup.lock"
flock 9

T_ALL=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
step() { # step <name> <function>
    local name=$1 fn=$2 t0 t1
    t0=$(date +%s.%N)
    printf '==> %s\n' "$name"
    "$fn"
    t1=$(date +%s.%N)
    printf '    %-34s %6.1f s\n' "$name" "$(elapsed "$t0" "$t1")"
    echo "$name $(elapsed "$t0" "$t1")" >>"$CACHE/.timings"
}

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup-env: must run as root (installs Debian packages, runs containerd/QEMU)" >&2
        exit 1
    fi
}

MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

HOST_PKGS=(qemu-system-x86 qemu-utils runc busybox-static mmdebstrap cpio kmod iproute2
           zstd xz-utils e2fsprogs socat containernetworking-plugins iptables
           libcap2-bin python3-venv ca-certificates python3-cryptography docker-registry
           skopeo catatonit tcpdump binutils erofs-utils cryptsetup-bin patchelf)

apt_host() {
    local missing=()
    for p in "${HOST_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then echo "    all ${#HOST_PKGS[@]} host packages present"; return; fi
    echo "    installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A private apt configuration for sid/trixie: never touches the system's sources.
APTDIR=$CACHE/apt
apt_private() { # apt_private <apt-get|apt-cache> <args...>
    local tool=$1; shift
    "$tool" -o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache" \
        -o Dir::State::Status="$APTDIR/status" \
        -o Acquire::Check-Valid-Until=false -o APT::Get::AllowUnauthenticated=false \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

apt_lists() {
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
    touch "$APTDIR/status"
    cat >"$APTDIR/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
SRC
    if [ -n "$(find "$APTDIR/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        echo "    sid/trixie package lists are fresh"; return
    fi
    apt_private apt-get update -qq
}

# fetch_deb <pkg> <version-prefix or ""> <dest dir>: download a .deb with the private config and
# unpack it into <dest dir> (dpkg -x), once.
fetch_deb() {
    local pkg=$1 ver=$2 dest=$3 spec
    if [ -f "$dest/.done" ]; then echo "    $pkg: cached in $dest"; return; fi
    rm -rf "$dest"; mkdir -p "$dest"
    spec=$pkg
    if [ -n "$ver" ]; then
        spec="$pkg=$(apt_private apt-cache madison "$pkg" | awk -F'|' -v v="$ver" '{gsub(/ /,"",$2)} index($2, v)==1 {print $2; exit}')"
        [ "$spec" != "$pkg=" ] || { echo "setup-env: $pkg $ver not found in sid/trixie" >&2; exit 1; }
    fi
    (cd "$dest" && apt_private apt-get download -qq "$spec" >/dev/null)
    for d in "$dest"/*.deb; do dpkg -x "$d" "$dest/root"; done
    rm -f "$dest"/*.deb
    touch "$dest/.done"
    echo "    $spec -> $dest/root"
}

containerd2() { fetch_deb containerd "$CONTAINERD2_VERSION" "$CACHE/containerd-$CONTAINERD2_VERSION"; }
containerd17() { fetch_deb containerd "$CONTAINERD17_VERSION" "$CACHE/containerd-$CONTAINERD17_VERSION"; }
vhost_vsock() { fetch_deb vhost-device-vsock "" "$CACHE/vhost-device-vsock"; }

guest_kernel() {
    local dest=$CACHE/kernel pkg
    if [ -f "$dest/.done" ]; then echo "    guest kernel cached: $(cat "$dest/.done")"; return; fi
    rm -rf "$dest"; mkdir -p "$dest"
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
    (cd "$dest" && apt-get -o APT::Sandbox::User=root download -qq "$pkg" >/dev/null)
    dpkg -x "$dest"/*.deb "$dest/root"
    rm -f "$dest"/*.deb
    echo "$pkg" >"$dest/.done"
    echo "    $pkg -> $dest/root"
}

qemu_sid_root() {
    local dest=$CACHE/qemu-sid
    if [ -f "$dest/.done" ]; then echo "    QEMU sid root cached: $(cat "$dest/.done")"; return; fi
    rm -rf "$dest"
    mmdebstrap --quiet --variant=apt --aptopt='Acquire::Check-Valid-Until "false"' \
        --include=qemu-system-x86,qemu-system-ppc,qemu-system-s390x,ovmf,ovmf-amdsev,ovmf-inteltdx \
        sid "$dest" "$MIRROR"
    chroot "$dest" qemu-system-x86_64 --version | head -1 >"$dest/.done"
    echo "    $(cat "$dest/.done")"
}

venv() {
    local v=$CACHE/venv stamp key
    key=$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-16)-$(echo "$REPO" | sha256sum | cut -c1-8)
    stamp=$v/.coco-stamp
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then echo "    venv up to date ($v)"; return; fi
    [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
    "$v/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$v/bin/pip" install -q -e "$REPO[dev]" >"$CACHE/pip-install.log" 2>&1; then
        cat "$CACHE/pip-install.log" >&2
        echo "setup-env: pip install failed (log above, also in $CACHE/pip-install.log)" >&2
        exit 1
    fi
    echo "$key" >"$stamp"
    echo "    installed coco-shim (editable, from $REPO) into $v"
}

write_env() {
    cat >"$CACHE/env.sh.new" <<ENV
# written by scripts/setup-env.sh; source it or read it (KEY=VALUE lines)
COCO_CACHE=$CACHE
COCO_VENV=$CACHE/venv
COCO_CONTAINERD2=$CACHE/containerd-$CONTAINERD2_VERSION/root/usr/bin
COCO_CONTAINERD17=$CACHE/containerd-$CONTAINERD17_VERSION/root/usr/bin
COCO_VHOST_DEVICE_VSOCK=$CACHE/vhost-device-vsock/root/usr/bin/vhost-device-vsock
COCO_KERNEL_ROOT=$CACHE/kernel/root
COCO_QEMU_SID_ROOT=$CACHE/qemu-sid
ENV
    mv "$CACHE/env.sh.new" "$CACHE/env.sh"
    echo "    $CACHE/env.sh"
}

need_root
: >"$CACHE/.timings"
step "host packages (bookworm)" apt_host
step "sid/trixie package lists" apt_lists
step "containerd $CONTAINERD2_VERSION (sid)" containerd2
step "containerd $CONTAINERD17_VERSION (trixie)" containerd17
step "vhost-device-vsock (sid)" vhost_vsock
step "guest kernel (bookworm)" guest_kernel
step "QEMU 11.1 root (mmdebstrap sid)" qemu_sid_root
step "python virtualenv" venv
step "environment file" write_env
printf '==> setup-env done in %s s (cache: %s)\n' "$(elapsed "$T_ALL" "$(date +%s.%N)")" "$CACHE"
