#!/usr/bin/env bash
# Runs the test suite, then checks that it left no streaming shared memory in
# /dev/shm and no streaming lock files in the temp dir.
set -uo pipefail
PY=${1:?usage: run-tests.sh PYTHON [pytest args...]}
shift

streaming_leftovers() {
    { ls /dev/shm 2>/dev/null | grep -E '^[0-9]{6}_' || true; } | sort
    { find "${TMPDIR:-/tmp}/streaming" -type f 2>/dev/null || true; } | sort
}

before=$(streaming_leftovers)
"$PY" -m pytest "$@"
status=$?
after=$(streaming_leftovers)
leaked=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
if [ -n "$leaked" ]; then
    echo "The tests left streaming shared memory or lock files behind:" >&2
    echo "$leaked" >&2
    [ $status = 0 ] && status=1
fi
exit $status
