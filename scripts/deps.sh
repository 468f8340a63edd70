#!/bin/sh
# Installs the Debian packages dsv3 builds and tests with; a no-op when all are present.
# --check: only report (exit 1 if something is missing). Not root: print the apt-get line,
# exit 2. The list is the one place that names the project's dependencies.
set -eu

PACKAGES="make gcc libc6-dev libzstd-dev libxxhash-dev libjansson-dev libpcre2-dev python3 python3-zstandard python3-xxhash libopenmpi-dev openmpi-bin gnuplot-nox"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done
missing=${missing# }

if [ -z "$missing" ]; then
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "dsv3: missing Debian packages: $missing (run 'make deps')" >&2
    exit 1
fi
line="apt-get install -y --no-install-recommends $missing"
if [ "$(id -u)" != 0 ]; then
    echo "dsv3: missing Debian packages: $missing" >&2
    echo "dsv3: run as root:  $line" >&2
    exit 2
fi
echo "dsv3: installing $missing" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet: update only when the install needs it.
$line >/dev/null 2>&1 || { apt-get update -q >/dev/null && $line; }
