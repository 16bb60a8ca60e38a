#!/bin/sh
# Run the nightly index rebuild every day at NIGHTLY_AT (HH:MM, UTC), or once with --once.
#
# Configured by environment variables (see docker/README.md):
#   NIGHTLY_AT          HH:MM UTC of the daily run (default 02:00)
#   NIGHTLY_RUN_ON_START  1: also run once right away when the loop starts (default 0)
#   NIGHTLY_GALLERY     gallery .npy file or shard directory (required)
#   NIGHTLY_IDS         ids file, one per line (optional)
#   NIGHTLY_METADATA    metadata CSV (optional)
#   NIGHTLY_ARGS        further `index-builder nightly` options, split on spaces
#                       (e.g. "--qe-k 10 --alpha 3 --keep 3 --threads 4")
#   AQE_INDEX_ROOT      index root to publish into (set in the image: /data/index)
#
# A failed run is recorded by the job itself (status record under the index root) and the loop
# goes on to the next day; with --once the job's exit status is returned.
set -eu

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) nightly-loop: $*"; }

run_job() {
    # exec: the job itself is the child that gets signals. NIGHTLY_ARGS is split on purpose.
    # shellcheck disable=SC2086
    exec index-builder nightly --root "${AQE_INDEX_ROOT:?AQE_INDEX_ROOT is not set}" \
        --gallery "${NIGHTLY_GALLERY:?NIGHTLY_GALLERY is not set}" \
        ${NIGHTLY_IDS:+--ids "$NIGHTLY_IDS"} \
        ${NIGHTLY_METADATA:+--metadata "$NIGHTLY_METADATA"} \
        --no-progress ${NIGHTLY_ARGS:-}
}

if [ "${1:-}" = "--once" ]; then
    run_job  # replaces this shell: the job's exit status is ours
fi
[ $# -eq 0 ] || { echo "usage: nightly-loop [--once]" >&2; exit 2; }

at="${NIGHTLY_AT:-02:00}"
case "$at" in
    [01][0-9]:[0-5][0-9] | 2[0-3]:[0-5][0-9]) ;;
    *) echo "nightly-loop: NIGHTLY_AT must be HH:MM (00:00 to 23:59 UTC), got '$at'" >&2; exit 2 ;;
esac
: "${NIGHTLY_GALLERY:?NIGHTLY_GALLERY is not set}"

# Stop promptly on `docker stop`: children run in the background and the loop waits for them,
# so the trap runs at once; a running job gets the signal too and records its failure.
child=""
stop() {
    log "stopping"
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" || true
    fi
    exit 0
}
trap stop TERM INT

in_background() {  # run_job execs, so $child is the job itself
    "$@" &
    child=$!
    code=0
    wait "$child" || code=$?
    child=""
    return "$code"
}

once() {
    code=0
    in_background run_job || code=$?
    if [ "$code" -eq 0 ]; then log "run succeeded"; else log "run failed with status $code"; fi
}

if [ "${NIGHTLY_RUN_ON_START:-0}" = "1" ]; then
    log "running once at start (NIGHTLY_RUN_ON_START=1)"
    once
fi
while :; do
    now=$(date -u +%s)
    next=$(date -u -d "today $at" +%s)
    [ "$next" -gt "$now" ] || next=$(date -u -d "tomorrow $at" +%s)
    log "next run at $(date -u -d "@$next" +%Y-%m-%dT%H:%M:%SZ) (in $((next - now))s)"
    in_background sleep "$((next - now))" || true
    once
done
