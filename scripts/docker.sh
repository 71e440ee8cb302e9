#!/usr/bin/env bash
# The Docker side of the project: the engine, the base images, the images, the smoke run.
#
#   scripts/docker.sh tools              install docker.io and mmdebstrap (apt) if missing
#   scripts/docker.sh with-daemon CMD..  run CMD with DOCKER_HOST set to an engine that
#                                        answers: $DOCKER_HOST, the default socket, or ours
#                                        (started for CMD, stopped by PID after it)
#   scripts/docker.sh start | stop       start our engine and leave it running / stop it
#   scripts/docker.sh env                the export line for our engine's socket
#   scripts/docker.sh bases              the Debian base images, unless present (REBUILD_BASES=1)
#   scripts/docker.sh fixtures-image     the Postgres + wal2json test image of fixtures/
#   scripts/docker.sh image              cargo build --release, then pgdeltastream:latest
#   scripts/docker.sh smoke              pgdeltastream:latest against the fixtures Postgres,
#                                        driven from the host as docs/operations.md shows
#   scripts/docker.sh test CARGO_ARGS..  bases, fixtures image, then cargo test with TEST_PG=docker
#   scripts/docker.sh test-all CARGO_ARGS..  test, image and smoke (the release build
#                                        alongside the bases)
#
# Everything but `tools`, `start`, `stop`, `env` and `with-daemon` expects DOCKER_HOST or the
# default socket to reach an engine (run them under `with-daemon`, as the Makefile does).
#
# Our engine is `dockerd --iptables=false` with its data under .tools/docker/data and its
# socket, exec root and pidfile under .tools/docker/run (or, where that path is too long
# for a unix socket, a directory of /tmp named after this checkout). No registry is
# reachable here, so images come from the Debian archive: mmdebstrap | docker import.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=${PGDELTASTREAM_DOCKER_DIR:-$ROOT/.tools/docker}
RUN_DIR=$TOOLS_DIR/run
# The longest socket dockerd puts under its exec root is ~55 bytes below it; sun_path holds
# 107.
if [ ${#RUN_DIR} -gt 48 ]; then
    RUN_DIR=/tmp/pgdeltastream-docker-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)
fi
OUR_SOCKET=$RUN_DIR/docker.sock
PIDFILE=$RUN_DIR/dockerd.pid
DEFAULT_SOCKET=/var/run/docker.sock

SUITE=bookworm
MIRROR=http://deb.debian.org
PG_BASE=pgdeltastream-postgres-base:$SUITE
RUNTIME_BASE=pgdeltastream-runtime-base:$SUITE
FIXTURES_IMAGE=pgdeltastream-test-postgres:15-wal2json
IMAGE=${IMAGE:-pgdeltastream:latest}
# The classic builder: bookworm's engine has no buildx, and a build FROM a local image needs
# nothing more.
export DOCKER_BUILDKIT=0

log() { echo "docker.sh: $*" >&2; }

# docker build, quiet: the classic builder's deprecation notice only when the build fails.
build() {
    local out
    out=$(docker build --quiet "$@" 2>&1) || { echo "$out" >&2; die "docker build $* failed"; }
}
die() { log "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        die "need root (or sudo) for: $*"; fi
}

cmd_tools() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}..."
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

answers() { DOCKER_HOST=$1 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# Sets DOCKER_HOST to an engine that answers, if any.
find_engine() {
    if [ -n "${DOCKER_HOST:-}" ]; then
        answers "$DOCKER_HOST" && return 0
        die "DOCKER_HOST=$DOCKER_HOST does not answer"
    fi
    local h
    for h in "unix://$DEFAULT_SOCKET" "unix://$OUR_SOCKET"; do
        if answers "$h"; then export DOCKER_HOST=$h; return 0; fi
    done
    return 1
}

cmd_start() {
    cmd_tools
    if answers "unix://$OUR_SOCKET"; then export DOCKER_HOST=unix://$OUR_SOCKET; return 0; fi
    [ "$(id -u)" = 0 ] || die "starting dockerd needs root"
    mkdir -p "$TOOLS_DIR/data" "$RUN_DIR"
    rm -f "$OUR_SOCKET" "$PIDFILE"
    remove_stale_links
    log "starting dockerd on $OUR_SOCKET (log: $TOOLS_DIR/dockerd.log)"
    # setsid: a Ctrl-C in the terminal reaches only the caller, which then stops the
    # engine in order (by PID).
    setsid dockerd --iptables=false \
        --host "unix://$OUR_SOCKET" \
        --data-root "$TOOLS_DIR/data" \
        --exec-root "$RUN_DIR/exec" \
        --pidfile "$PIDFILE" \
        >"$TOOLS_DIR/dockerd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do
        if answers "unix://$OUR_SOCKET"; then export DOCKER_HOST=unix://$OUR_SOCKET; return 0; fi
        kill -0 $! 2>/dev/null || break
        sleep 0.5
    done
    tail -n 30 "$TOOLS_DIR/dockerd.log" >&2 || true
    die "dockerd did not answer on $OUR_SOCKET"
}

# An engine killed with its containers leaves their host-side veths on docker0, and a
# stale one answers ARP for an address the next engine gives a new container: connections
# to that container then reset or go nowhere. It also leaves its mounts (the containers'
# overlays, their network namespaces) under our data and exec roots, which keep those
# namespaces alive and the directories undeletable. With no dockerd running, every veth
# on docker0 and every mount under our roots is such a leftover.
remove_stale_links() {
    pgrep -x dockerd >/dev/null && return 0
    local mount link
    for mount in $(awk -v data="$TOOLS_DIR/data" -v run="$RUN_DIR" \
        'index($2, data "/") == 1 || $2 == data || index($2, run "/") == 1 {print $2}' /proc/mounts | sort -r); do
        log "unmounting $mount, left by an engine that is gone"
        umount -l "$mount" || true
    done
    for link in $(ip -o link show master docker0 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
        log "removing $link, left on docker0 by an engine that is gone"
        ip link delete "$link" || true
    done
}

cmd_stop() {
    [ -f "$PIDFILE" ] || { log "no dockerd of ours ($PIDFILE missing)"; return 0; }
    local pid i
    pid=$(cat "$PIDFILE")
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; return 0; }
        sleep 0.5
    done
    log "dockerd (pid $pid) still runs after 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
}

cmd_env() { echo "export DOCKER_HOST=unix://$OUR_SOCKET"; }

cmd_with_daemon() {
    [ $# -gt 0 ] || die "with-daemon: no command"
    if ! find_engine; then
        cmd_start
        # Stopped however CMD ends, Ctrl-C included.
        trap 'cmd_stop' EXIT
        trap 'exit 130' INT TERM
    fi
    log "engine: $DOCKER_HOST"
    "$@"
}

# mmdebstrap a bookworm minbase tree with PACKAGES into image TAG, unless TAG exists.
debian_base() {
    local tag=$1 packages=$2
    if [ -z "${REBUILD_BASES:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
        log "$tag: present"
        return 0
    fi
    log "$tag: mmdebstrap $SUITE + $packages | docker import (about 2 min)"
    local logfile=$TOOLS_DIR/mmdebstrap-${tag//[:\/]/_}.log
    mkdir -p "$TOOLS_DIR"
    if ! mmdebstrap --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" - \
        "deb $MIRROR/debian $SUITE main" \
        "deb $MIRROR/debian $SUITE-updates main" \
        "deb $MIRROR/debian-security $SUITE-security main" \
        2>"$logfile" | docker import --message "mmdebstrap $SUITE minbase + $packages" - "$tag" >/dev/null; then
        tail -n 20 "$logfile" >&2
        die "$tag: mmdebstrap | docker import failed (log: $logfile)"
    fi
}

cmd_bases() {
    command -v mmdebstrap >/dev/null 2>&1 || cmd_tools
    # Both at once: the time goes to downloads and dpkg, not to one core.
    debian_base "$PG_BASE" postgresql-15,postgresql-15-wal2json &
    local pg=$!
    local rc=0
    debian_base "$RUNTIME_BASE" ca-certificates || rc=$?
    wait "$pg" || rc=$?
    return $rc
}

cmd_fixtures_image() {
    cmd_bases
    build --tag "$FIXTURES_IMAGE" "$ROOT/fixtures"
    log "$FIXTURES_IMAGE: built"
}

release_build() { (cd "$ROOT" && cargo build --release --locked --bin pgdeltastream); }

cmd_image() {
    cmd_bases
    release_build
    # A context of the binary alone: target/ is gigabytes.
    local ctx=$TOOLS_DIR/image-context
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp "$ROOT/target/release/pgdeltastream" "$ctx/"
    build --tag "$IMAGE" --file "$ROOT/docker/Dockerfile" "$ctx"
    log "$IMAGE: built"
}

cmd_test() {
    cmd_fixtures_image
    (cd "$ROOT" && TEST_PG=docker cargo test "$@")
}

# What `make test-docker` runs: the release build (CPU) alongside the bases (downloads and
# dpkg), then the tests, the server image and the smoke run.
cmd_test_all() {
    local log=$TOOLS_DIR/release-build.log
    mkdir -p "$TOOLS_DIR"
    release_build >"$log" 2>&1 &
    local release=$!
    local rc=0
    cmd_fixtures_image || rc=$?
    if ! wait "$release"; then
        cat "$log" >&2
        die "cargo build --release failed"
    fi
    [ $rc -eq 0 ] || return $rc
    cmd_test "$@"
    cmd_image
    cmd_smoke
}

cmd_smoke() {
    local venv_python=$ROOT/.tools/venv/bin/python
    [ -x "$venv_python" ] || die "no $venv_python: run \`make clients\` first"
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run \`make image\` first"
    cmd_fixtures_image
    DOCKER_HOST=$DOCKER_HOST IMAGE=$IMAGE FIXTURES_IMAGE=$FIXTURES_IMAGE \
        "$venv_python" "$ROOT/scripts/docker_smoke.py"
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
        tools) cmd_tools ;;
        start) cmd_start; cmd_env ;;
        stop) cmd_stop ;;
        env) cmd_env ;;
        with-daemon) cmd_with_daemon "$@" ;;
        bases|fixtures-image|image|smoke|test|test-all)
            find_engine || die "no Docker engine answers (DOCKER_HOST, $DEFAULT_SOCKET, $OUR_SOCKET): use \`scripts/docker.sh with-daemon\` or \`start\`"
            "cmd_${cmd//-/_}" "$@" ;;
        *) sed -n '2,20p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
    esac
}

main "$@"
