#!/usr/bin/env bash
# Runs a command (a test worker) in a private mount namespace with its own, empty /dev/shm,
# and with a temp dir of its own.
#
# streaming picks a free shared-memory prefix, then creates it; two processes that start a
# dataset at the same moment can pick the same one, and one of them fails. Test workers that
# run side by side each get their own /dev/shm here, so they never race (nor do the processes
# their tests start). streaming also skips prefixes whose lock files exist in the temp dir, so
# a worker gets its own temp dir as well: with a shared one, the ranks of a test could see
# another worker's new lock file at different moments and pick different prefixes.
# Whatever streaming segments the command leaves behind are written, one name a line, to
# "$JEST_STREAM_SHM_LEFT/<pid>" when it ends: once the namespace is gone, so are they, and the
# caller could not see them otherwise. The temp dir stays, for the caller to check.
#
# Needs root and util-linux's unshare (run-tests.sh uses it only then).
set -uo pipefail
: "${JEST_STREAM_SHM_LEFT:?set JEST_STREAM_SHM_LEFT to a folder for the lists of leftovers}"
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/worker.XXXXXX") || exit 1
export TMPDIR
exec unshare --mount --propagation private bash -c '
    mount -t tmpfs -o size=25% tmpfs /dev/shm || exit 1
    "$@"
    status=$?
    find /dev/shm -maxdepth 1 -name "[0-9][0-9][0-9][0-9][0-9][0-9]_*" -printf "%f\n" \
        > "$JEST_STREAM_SHM_LEFT/$$"
    exit $status' bash "$@"
