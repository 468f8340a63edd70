#!/bin/sh
# Packs this build for the lent GPU machine (the device tool copies the working tree and
# the paths named in `carry`, 64 MiB in all): every program, test and bench binary, built
# first (`make tests` alone leaves tests/bench out), debug info stripped, as one xz tarball
# .stage-pack/build.txz (about 25 MB: half of gzip's, so two builds, e.g. a baseline and a
# branch, fit the carry limit together; xz -T2 takes ~2 min here). On the device:
#   run(carry [".stage-pack"], command "sh scripts/stage-device.sh unpack && BUILD=.stage-lead/build sh scripts/gpu-check.sh")
# Usage: scripts/stage-device.sh [pack|unpack]   (BUILD=build)
set -eu
BUILD=${BUILD:-build}
case "${1:-pack}" in
pack)
    make --no-print-directory -j2 tests $(ls tests/bench/*.c | sed "s|^tests/bench/\(.*\)\.c$|$BUILD/tests/bench/\1|") >/dev/null
    rm -rf .stage-lead .stage-pack
    mkdir -p .stage-lead/build/tests .stage-pack
    cp -a "$BUILD/bin" .stage-lead/build/
    for d in lib gen; do [ -d "$BUILD/$d" ] && cp -a "$BUILD/$d" .stage-lead/build/; done
    cp -a "$BUILD/tests/gpu" "$BUILD/tests/bench" .stage-lead/build/tests/
    find .stage-lead \( -name '*.o' -o -name '*.d' \) -delete
    find .stage-lead/build -type f -perm -u+x -exec strip --strip-debug {} + 2>/dev/null || true
    # the commit the build is of (the device's copy of the tree may carry a stale git HEAD)
    git describe --always --dirty >.stage-lead/build/COMMIT 2>/dev/null || echo ? >.stage-lead/build/COMMIT
    tar -C .stage-lead -cf - build | xz -T2 -6 >.stage-pack/build.txz
    rm -rf .stage-lead
    echo "staged: .stage-pack/build.txz ($(du -m .stage-pack/build.txz | cut -f1) MiB), commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
    ;;
unpack)
    # xz where the machine has it, else python3's lzma
    mkdir -p .stage-lead
    if command -v xz >/dev/null 2>&1; then
        xz -dc .stage-pack/build.txz | tar -C .stage-lead -xf -
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
            .stage-pack/build.txz | tar -C .stage-lead -xf -
    fi
    ;;
*)
    echo "usage: scripts/stage-device.sh [pack|unpack]" >&2
    exit 2
    ;;
esac
