#!/usr/bin/env bash
# `make run`: dev Postgres + the release server in the foreground. Ctrl-C (or the server
# exiting) stops both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PORT="${DEV_PGPORT:-54329}"
SERVERPORT="${SERVERPORT:-12312}"
BIN="target/release/pgdeltastream"
# auto, wal2json or pgoutput (`make run PLUGIN=pgoutput`).
PLUGIN="${PLUGIN:-auto}"
[[ -x "$BIN" ]] || { echo "run-dev: $BIN missing; run 'cargo build --release'" >&2; exit 1; }

cleanup() {
    trap - EXIT INT TERM
    echo >&2
    scripts/dev-postgres.sh stop || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/dev-postgres.sh start

case "$PLUGIN" in
auto)
    CHOSEN="$(scripts/dev-postgres.sh plugin)"
    if [[ "$CHOSEN" == wal2json ]]; then
        OTHER="pgoutput (built into Postgres, a publication per session): make run PLUGIN=pgoutput"
    else
        OTHER="wal2json: install postgresql-15-wal2json (make setup), then make run"
    fi
    PLUGIN_LINE="Plugin: auto takes $CHOSEN on this Postgres. To try $OTHER"
    ;;
wal2json) PLUGIN_LINE="Plugin: wal2json (--plugin wal2json). Back to the default: make run" ;;
pgoutput) PLUGIN_LINE="Plugin: pgoutput (--plugin pgoutput), a publication per session. Back to the default: make run" ;;
*) echo "run-dev: PLUGIN=$PLUGIN: expected auto, wal2json or pgoutput" >&2; exit 2 ;;
esac

cat <<EOF

$PLUGIN_LINE

pgdeltastream on localhost:$SERVERPORT (Ctrl-C stops it and the dev Postgres).

  Open http://localhost:$SERVERPORT/ for the viewer: sessions, lag, a live feed, snapshots.
  Health and metrics: curl localhost:$SERVERPORT/readyz ; curl localhost:$SERVERPORT/metrics

Try, in another shell:

  # 1. init: create a replication slot, note its slotName (/v1/sessions shows its plugin)
  curl localhost:$SERVERPORT/v1/init
  curl localhost:$SERVERPORT/v1/sessions

  # 2. snapshot data as of the slot's creation
  curl -X POST http://localhost:$SERVERPORT/v1/snapshot/data \\
    -H 'content-type: application/json' \\
    -d '{"table": "test_table", "offset":0, "limit":5}'

  # 3. stream changes over a websocket (replace <slot> with the slotName from step 1)
  websocat 'ws://localhost:$SERVERPORT/v1/lr/stream?slotName=<slot>'
  #    or, without websocat (pip install websockets):
  python3 -c 'import asyncio,sys,websockets as w;exec("async def m():\\n async with w.connect(sys.argv[1]) as c:\\n  async for x in c: print(x)");asyncio.run(m())' 'ws://localhost:$SERVERPORT/v1/lr/stream?slotName=<slot>'

  # 4. make a change and watch it arrive on the websocket
  psql -h 127.0.0.1 -p $PORT -U postgres -c "INSERT INTO test_table (name) VALUES ('newval1')"

  # v2: a named session of its own tables and actions, its snapshot a page at a time,
  # and its stream
  curl -X POST localhost:$SERVERPORT/v2/sessions -H 'content-type: application/json' \
    -d '{"name": "inserts", "tables": ["test_table"], "actions": ["insert"]}'
  curl 'localhost:$SERVERPORT/v2/sessions/inserts/snapshot/test_table?limit=2'
  websocat 'ws://localhost:$SERVERPORT/v2/sessions/inserts/stream'

EOF

# Foreground, so Ctrl-C reaches the server directly; the EXIT trap then stops Postgres.
DBNAME=postgres PGUSER=postgres PGHOST=127.0.0.1 PGPORT="$PORT" \
    SERVERHOST=localhost SERVERPORT="$SERVERPORT" "$BIN" --plugin "$PLUGIN"
