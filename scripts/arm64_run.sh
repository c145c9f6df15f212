#!/bin/sh
# Run a command on aarch64 (qemu-user) inside the chroot made by scripts/arm64_chroot.sh, in a
# snapshot of this checkout's HEAD (git archive, so uncommitted edits stay out) placed at
# $ROOT/work/main, with ../shared (the tests' reference fixtures) mounted read-only beside it.
# Pure numpy: the chroot has no numba and no torch.
# Usage (as root): sh scripts/arm64_run.sh 'python3 -m pytest tests -q'
set -eu
ROOT=${ARM64_ROOT:-/work/arm64-root}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$(dirname "$REPO")/shared
SRC=/work/main  # where the snapshot sits inside the chroot

if mountpoint -q "$ROOT$SRC"; then echo "$ROOT$SRC is a mount point: unmount it first" >&2; exit 1; fi
rm -rf "$ROOT$SRC" && mkdir -p "$ROOT$SRC"
git -C "$REPO" archive HEAD | tar -x -C "$ROOT$SRC"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mkdir -p "$ROOT$(dirname $SRC)/shared"
if [ -d "$SHARED" ] && ! mountpoint -q "$ROOT$(dirname $SRC)/shared"; then
    mount --bind "$SHARED" "$ROOT$(dirname $SRC)/shared"
    mount -o remount,ro,bind "$ROOT$(dirname $SRC)/shared"
fi

cd /  # chroot's cwd must lie inside ROOT
exec chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    PYTHONPATH="$SRC" PYTHONDONTWRITEBYTECODE=1 TINYI2V_BACKEND=numpy \
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
    /bin/sh -c "cd '$SRC' && $1"
