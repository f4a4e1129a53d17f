#!/usr/bin/env bash
# Makes sure Debian's dataset-fashion-mnist is installed (the real data the
# demo and benchmarks train on). Installs it when running as root; otherwise
# says what to run.
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
    for f in "${FILES[@]}"; do [ -s "$DIR/$f" ] || return 1; done
}

if have_all; then
    exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Debian package dataset-fashion-mnist ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

if ! have_all; then
    cat >&2 <<MSG
Fashion-MNIST is missing from $DIR.
Install it with:   sudo apt-get install dataset-fashion-mnist
or point JEST_STREAM_FASHION_MNIST at a folder holding the four gzipped IDX files
(${FILES[*]}).
MSG
    [ -n "${JEST_STREAM_FASHION_MNIST:-}" ] && exit 0
    exit 1
fi
