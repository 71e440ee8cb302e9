#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for local development (`make run`).
#
#   scripts/dev-postgres.sh [start]   initdb if needed, start, seed test_table, print settings
#   scripts/dev-postgres.sh stop      pg_ctl stop -m fast
#   scripts/dev-postgres.sh status
#   scripts/dev-postgres.sh clean     stop and delete the cluster
#   scripts/dev-postgres.sh plugin    the plugin `--plugin auto` takes on the running cluster
#
# Data lives in .dev/ (gitignored) at the repository root. As root, the server runs as the
# `postgres` user; if that user cannot reach .dev/ (e.g. the repository lives under /root),
# the cluster goes to /tmp/pgdeltastream-dev-$UID instead.
# Environment: DEV_PGPORT (default 54329), PG_BINDIR (default: the highest
# /usr/lib/postgresql/*/bin with wal2json, else pg_config --bindir, else the highest one).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${DEV_PGPORT:-54329}"
PROJECT_BASE="$ROOT/.dev"
FALLBACK_BASE="/tmp/pgdeltastream-dev-$(id -u)"

say() { printf 'dev-postgres: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

find_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        echo "$PG_BINDIR"
        return
    fi
    # Prefer an installation that has wal2json.
    local d first=""
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -Vr); do
        [[ -x "$d/initdb" && -x "$d/postgres" ]] || continue
        [[ -n "$first" ]] || first="$d"
        if [[ -f "$d/../lib/wal2json.so" ]]; then
            echo "$d"
            return
        fi
    done
    if d="$(pg_config --bindir 2>/dev/null)" && [[ -x "$d/initdb" && -x "$d/postgres" ]]; then
        echo "$d"
        return
    fi
    if [[ -n "$first" ]]; then
        echo "$first"
        return
    fi
    die "no PostgreSQL server binaries found; run 'make setup' (or set PG_BINDIR)"
}

BINDIR="$(find_bindir)"
IS_ROOT=0
[[ "$(id -u)" == 0 ]] && IS_ROOT=1

# Runs a PostgreSQL server tool as the right user, from a directory it can reach.
as_pg() {
    if ((IS_ROOT)); then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# Can the postgres user create and use files in $1?
pg_can_use() {
    as_pg test -d "$1" -a -w "$1" -a -x "$1" 2>/dev/null
}

# Where an existing cluster lives (empty if none).
existing_base() {
    local b
    for b in "$PROJECT_BASE" "$FALLBACK_BASE"; do
        if [[ -f "$b/data/PG_VERSION" ]]; then
            echo "$b"
            return
        fi
    done
}

# Picks (and prepares) the base directory for a new cluster.
choose_base() {
    if ((IS_ROOT)); then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user; run 'make setup'"
        local created=0
        if [[ ! -d "$PROJECT_BASE" ]]; then
            mkdir -p "$PROJECT_BASE"
            created=1
        fi
        chown postgres: "$PROJECT_BASE"
        chmod 700 "$PROJECT_BASE"
        if pg_can_use "$PROJECT_BASE"; then
            echo "$PROJECT_BASE"
            return
        fi
        ((created)) && rmdir "$PROJECT_BASE"
        say "the postgres user cannot reach $PROJECT_BASE (is the repository under a private"
        say "directory such as /root?); using $FALLBACK_BASE instead"
        mkdir -p "$FALLBACK_BASE"
        chown postgres: "$FALLBACK_BASE"
        chmod 700 "$FALLBACK_BASE"
        pg_can_use "$FALLBACK_BASE" || die "the postgres user cannot use $FALLBACK_BASE either"
        echo "$FALLBACK_BASE"
    else
        mkdir -p "$PROJECT_BASE"
        echo "$PROJECT_BASE"
    fi
}

print_settings() {
    local base="$1"
    cat <<EOF
Dev Postgres is running:
  data dir:   $base/data
  log:        $base/postgres.log
  connect:    psql -h 127.0.0.1 -p $PORT -U postgres postgres
  server env: DBNAME=postgres PGUSER=postgres PGHOST=127.0.0.1 PGPORT=$PORT
  stop:       scripts/dev-postgres.sh stop
EOF
}

cmd_start() {
    local base
    base="$(existing_base)"
    if [[ -z "$base" ]]; then
        base="$(choose_base)"
        say "initdb in $base/data"
        as_pg "$BINDIR/initdb" -D "$base/data" --auth=trust -U postgres \
            --encoding=UTF8 --locale=C >"$base/initdb.log" 2>&1 ||
            { cat "$base/initdb.log" >&2; die "initdb failed"; }
        # Settings live in their own file, rewritten at every start (the port may change).
        echo "include_if_exists = 'pgdeltastream-dev.conf'" >>"$base/data/postgresql.conf"
    fi
    local data="$base/data"

    if as_pg "$BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        say "already running ($data)"
    else
        cat >"$data/pgdeltastream-dev.conf" <<EOF
# Written by scripts/dev-postgres.sh at each start.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$data'
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
EOF
        # PostgreSQL 15.19+ trusts only the output plugins listed here; older
        # servers do not know the setting and must not get it.
        if "$BINDIR/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
            echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'" >>"$data/pgdeltastream-dev.conf"
        fi
        ((IS_ROOT)) && chown postgres: "$data/pgdeltastream-dev.conf"
        say "starting on 127.0.0.1:$PORT"
        if ! as_pg "$BINDIR/pg_ctl" -D "$data" -l "$base/postgres.log" -w -t 60 start >/dev/null; then
            tail -n 30 "$base/postgres.log" >&2 || true
            die "Postgres did not start (log: $base/postgres.log)"
        fi
    fi

    # The port of a cluster that was already running may differ from $PORT.
    PORT="$(as_pg "$BINDIR/postgres" -D "$data" -C port 2>/dev/null || echo "$PORT")"
    local i
    for ((i = 0; i < 100; i++)); do
        "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" && break
        sleep 0.1
    done
    "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" || die "not accepting connections on 127.0.0.1:$PORT"

    "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres <<'SQL'
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS test_table (id serial PRIMARY KEY, name text);
INSERT INTO test_table (name)
SELECT v FROM unnest(ARRAY['abc', 'abc1', 'abc2', 'val1', 'val2']) WITH ORDINALITY AS s(v, n)
WHERE NOT EXISTS (SELECT 1 FROM test_table)
ORDER BY n;
SQL
    print_settings "$base"
}

cmd_stop() {
    local base
    base="$(existing_base)"
    if [[ -z "$base" ]]; then
        say "no dev cluster"
        return 0
    fi
    if as_pg "$BINDIR/pg_ctl" -D "$base/data" status >/dev/null 2>&1; then
        as_pg "$BINDIR/pg_ctl" -D "$base/data" -m fast -w stop >/dev/null
        say "stopped ($base/data)"
    else
        say "not running ($base/data)"
    fi
}

cmd_status() {
    local base
    base="$(existing_base)"
    if [[ -z "$base" ]]; then
        say "no dev cluster"
        return 3
    fi
    as_pg "$BINDIR/pg_ctl" -D "$base/data" status
}

# What `--plugin auto` does, on the running cluster: wal2json when Postgres can load it
# (tried with a temporary slot, gone with the session), pgoutput otherwise.
cmd_plugin() {
    if "$BINDIR/psql" -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c \
        "SELECT 1 FROM pg_create_logical_replication_slot('pgdeltastream_probe_' || pg_backend_pid(), 'wal2json', true)" \
        >/dev/null 2>&1; then
        echo wal2json
    else
        echo pgoutput
    fi
}

cmd_clean() {
    cmd_stop
    local b
    for b in "$PROJECT_BASE" "$FALLBACK_BASE"; do
        if [[ -d "$b" ]]; then
            rm -rf "$b"
            say "removed $b"
        fi
    done
}

case "${1:-start}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
clean) cmd_clean ;;
plugin) cmd_plugin ;;
*)
    echo "usage: $0 [start|stop|status|clean|plugin]" >&2
    exit 2
    ;;
esac
