#!/usr/bin/env bash
# Runs the test suite, then checks that it left no streaming shared memory in /dev/shm and
# no streaming lock files in the temp dir.
#
# Where the system allows it (root, util-linux's unshare), the suite runs in a private mount
# namespace with its own /dev/shm and temp dir: streaming jobs elsewhere on the machine
# neither see the suite's segments nor count as its leaks, and everything left in the
# private /dev/shm is the suite's own. Elsewhere the check compares /dev/shm before and
# after, counting only new segments that no live process uses.
set -uo pipefail
PY=${1:?usage: run-tests.sh PYTHON [pytest args...]}
shift

if [ -z "${JEST_STREAM_TEST_NAMESPACE:-}" ] && [ "$(id -u)" = 0 ] \
        && command -v unshare >/dev/null && unshare --mount true 2>/dev/null; then
    export JEST_STREAM_TEST_NAMESPACE=1
    exec unshare --mount --propagation private bash -c \
        'mount -t tmpfs -o size=50% tmpfs /dev/shm && exec bash "$0" "$@"' "$0" "$PY" "$@"
fi

private_tmp=$(mktemp -d)
trap 'rm -rf "$private_tmp"' EXIT
export TMPDIR=$private_tmp

unused() {  # streaming segments no live process maps or holds open
    "$PY" -c 'from jest_stream.shm import stale_shared_memory
for path in stale_shared_memory(): print(path.name)' | sort
}

# Test workers (pytest-xdist): one a core, at most four, each with a /dev/shm of its own
# (scripts/private-shm.sh), where the private namespace allows it; elsewhere the tests run one
# after another, as workers sharing a /dev/shm would race for streaming's prefixes.
# JEST_STREAM_TEST_WORKERS sets the number (1: no workers, e.g. to debug).
workers=${JEST_STREAM_TEST_WORKERS:-$(nproc)}
if ! [[ $workers =~ ^[1-9][0-9]*$ ]]; then
    echo "JEST_STREAM_TEST_WORKERS=$workers must be a whole number >= 1" >&2
    exit 2
fi
[ "$workers" -gt 4 ] && [ -z "${JEST_STREAM_TEST_WORKERS:-}" ] && workers=4
if [ "$workers" -gt 1 ] && [ -z "${JEST_STREAM_TEST_NAMESPACE:-}" ]; then
    echo "Running the tests one after another: parallel workers need a private /dev/shm" \
         "each (root and util-linux's unshare)." >&2
    workers=1
fi
# pytest arguments that choose their own workers, or need a single process, run as given.
previous=
for arg in "$@"; do
    case "$previous $arg" in
        *' '-n*|*' '--numprocesses*|*' '--dist*|*' '--tx*|*' '-pno:xdist|'-p no:xdist' \
                |*' '--pdb|*' '--trace|*' '--collect-only|*' '--co) workers=1 ;;
    esac
    previous=$arg
done
parallel=()
if [ "$workers" -gt 1 ]; then
    export JEST_STREAM_SHM_LEFT=$private_tmp/shm-left
    mkdir "$JEST_STREAM_SHM_LEFT"
    here=$(cd "$(dirname "$0")" && pwd)
    case $PY in
        */*) python=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;
        *) python=$(command -v "$PY") ;;
    esac
    # execnet splits the python= value as a shell would: quote each word.
    command=$(printf '%q ' bash "$here/private-shm.sh" "$python")
    parallel=(--dist loadfile --tx "$workers*popen//python=${command% }")
fi

before=$(unused)
"$PY" -m pytest --durations=20 "${parallel[@]}" "$@"
status=$?
leaked=$( (comm -13 <(echo "$before") <(unused); cat "${JEST_STREAM_SHM_LEFT:-/dev/null}"/* \
           2>/dev/null) | sed '/^$/d')
# streaming's lock files, in the temp dir and in the workers' own (scripts/private-shm.sh).
locks=$(find "$TMPDIR/streaming" "$TMPDIR"/worker.*/streaming -type f 2>/dev/null)
if [ -n "$leaked$locks" ]; then
    echo "The tests left streaming shared memory or lock files behind:" >&2
    [ -n "$leaked" ] && echo "$leaked" >&2
    [ -n "$locks" ] && echo "$locks" >&2
    [ $status = 0 ] && status=1
fi
exit $status
