#!/bin/sh
# Build an arm64 Debian bookworm chroot run through qemu-user, with Debian's own numpy, Pillow,
# click and pytest (no numba, no torch), for running tinyi2v's pure-numpy path on aarch64.
# Usage (as root on an x86-64 Debian/Ubuntu host): sh scripts/arm64_chroot.sh [ROOT]
set -eu
ROOT=${1:-/work/arm64-root}
MIRROR=http://deb.debian.org/debian

apt-get install -y qemu-user-static binfmt-support debootstrap
# Register qemu-aarch64 with binfmt_misc (in a container the fs may not be mounted yet).
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64

debootstrap --arch=arm64 --variant=minbase --foreign bookworm "$ROOT" "$MIRROR"
# The F flag in binfmt_misc makes the host's qemu usable inside the chroot; copying it in also
# lets `chroot ROOT /usr/bin/qemu-aarch64-static /usr/bin/python3 ...` work where binfmt cannot be used.
cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
chroot "$ROOT" /debootstrap/debootstrap --second-stage
chroot "$ROOT" apt-get update
chroot "$ROOT" apt-get install -y --no-install-recommends \
    python3 python3-numpy python3-pil python3-click python3-pytest python3-hypothesis \
    python3-imageio python3-av
# For the Termux-like check (system numpy/Pillow + `pip install` without extras in a venv):
chroot "$ROOT" apt-get install -y --no-install-recommends python3-venv python3-pip
chroot "$ROOT" python3 -c 'import platform, numpy, PIL, click; print(platform.machine(), numpy.__version__, PIL.__version__, click.__version__)'
