#!/usr/bin/env bash
# Runs a command (a test worker) in a private mount namespace with its own, empty /dev/shm.
#
# streaming picks a free shared-memory prefix, then creates it; two processes that start a
# dataset at the same moment can pick the same one, and one of them fails. Test workers that
# run side by side each get their own /dev/shm here, so they never race (nor do the processes
# their tests start). Whatever streaming segments the command leaves behind are written, one
# name a line, to "$JEST_STREAM_SHM_LEFT/<pid>" when it ends: once the namespace is gone, so
# are they, and the caller could not see them otherwise.
#
# Needs root and util-linux's unshare (run-tests.sh uses it only then).
set -uo pipefail
: "${JEST_STREAM_SHM_LEFT:?set JEST_STREAM_SHM_LEFT to a folder for the lists of leftovers}"
exec unshare --mount --propagation private bash -c '
    mount -t tmpfs -o size=25% tmpfs /dev/shm || exit 1
    "$@"
    status=$?
    find /dev/shm -maxdepth 1 -name "[0-9][0-9][0-9][0-9][0-9][0-9]_*" -printf "%f\n" \
        > "$JEST_STREAM_SHM_LEFT/$$"
    exit $status' bash "$@"
