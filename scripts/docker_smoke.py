"""Smoke run of the server's image (scripts/docker.sh smoke; `make docker-smoke`).

Starts the fixtures Postgres container, then $IMAGE with exactly the environment of the
`docker run` line in docs/operations.md (PGHOST: the Postgres container's address on the
default bridge) and its port published on a free port of 127.0.0.1, and drives it from this
host as the README's "Try it" does: /v1/init, /v1/snapshot/data, a websocket stream that
receives an INSERT made with psql and acks it (the slot's confirmed_flush_lsn then moves).
Removes both containers; exits non-zero on any failure, with the server's `docker logs`.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import websockets

IMAGE = os.environ.get("IMAGE", "pgdeltastream:latest")
FIXTURES_IMAGE = os.environ.get("FIXTURES_IMAGE", "pgdeltastream-test-postgres:15-wal2json")
LABEL = f"pgdeltastream.smoke-pid={os.getpid()}"
TIMEOUT = 60


def docker(*args, check=True):
    out = subprocess.run(["docker", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def psql(pg, sql):
    return docker("exec", pg, "psql", "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                  "-Atc", sql)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, probe):
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            result = probe()
            if result:
                return result
            err = "not yet"
        except Exception as e:  # noqa: BLE001 - any failure means "not yet" until the deadline
            err = e
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {TIMEOUT} s ({err})")
        time.sleep(0.5)


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


async def stream_one_insert(base_ws, slot, pg):
    async with websockets.connect(f"{base_ws}/v1/lr/stream?slotName={slot}", open_timeout=30) as ws:
        psql(pg, "INSERT INTO test_table (name) VALUES ('newval1')")
        msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        print(f"smoke: the websocket received {json.dumps(msg)}")
        changes = msg.get("change") or []
        check(any(c.get("kind") == "insert" and c.get("table") == "test_table"
                  and "newval1" in (c.get("columnvalues") or []) for c in changes),
              f"expected the INSERT of newval1, got {msg}")
        await ws.send(json.dumps({"lsn": msg["nextlsn"]}))
        # The server confirms acked positions to Postgres on its status interval.
        wait_for("the ack reaching the slot", lambda: psql(
            pg, f"SELECT confirmed_flush_lsn >= '{msg['nextlsn']}' FROM pg_replication_slots "
                f"WHERE slot_name = '{slot}'") == "t")
        print(f"smoke: acked {msg['nextlsn']}; the slot's confirmed_flush_lsn has moved past it")


def run(pg_name, srv_name):
    docker("run", "--detach", "--name", pg_name, "--label", LABEL, FIXTURES_IMAGE)
    wait_for("Postgres in its container", lambda: psql(pg_name, "SELECT 1") == "1")
    psql(pg_name, "CREATE TABLE test_table (id serial PRIMARY KEY, name text); "
                  "INSERT INTO test_table (name) VALUES ('abc'), ('abc1'), ('abc2'), ('val1'), ('val2')")
    pg_ip = docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", pg_name)
    check(pg_ip, "the Postgres container has no address")
    port = free_port()
    # The line in docs/operations.md, but published on loopback only.
    docker("run", "--detach", "--name", srv_name, "--label", LABEL,
           "-e", "DBNAME=postgres", "-e", "PGUSER=postgres", "-e", f"PGHOST={pg_ip}", "-e", "PGPORT=5432",
           "-e", "SERVERHOST=0.0.0.0", "-e", "SERVERPORT=12312",
           "-p", f"127.0.0.1:{port}:12312", IMAGE)
    base = f"http://127.0.0.1:{port}"
    print(f"smoke: Postgres at {pg_ip}:5432 (container {pg_name}), {IMAGE} published on {base}")

    def init():
        running = docker("inspect", "--format", "{{.State.Running}}", srv_name)
        if running != "true":
            raise SystemExit(f"the server container stopped: {docker('inspect', '--format', '{{.State.Status}} exit {{.State.ExitCode}}', srv_name)}")
        return http("GET", f"{base}/v1/init")

    status, body = wait_for("GET /v1/init", init)
    check(status == 200 and isinstance(body, dict) and body.get("slotName"), f"/v1/init: {status} {body}")
    slot = body["slotName"]
    print(f"smoke: GET /v1/init -> {body}")
    status, rows = http("POST", f"{base}/v1/snapshot/data", {"table": "test_table", "offset": 0, "limit": 5})
    check(status == 200, f"/v1/snapshot/data: {status} {rows}")
    check([r.get("name") for r in rows] == ["abc", "abc1", "abc2", "val1", "val2"], f"snapshot rows: {rows}")
    print(f"smoke: POST /v1/snapshot/data -> {len(rows)} rows")
    asyncio.run(stream_one_insert(f"ws://127.0.0.1:{port}", slot, pg_name))


def main():
    pg_name = f"pgdeltastream-smoke-pg-{os.getpid()}"
    srv_name = f"pgdeltastream-smoke-server-{os.getpid()}"
    ok = False
    try:
        run(pg_name, srv_name)
        ok = True
    except (Exception, SystemExit) as e:  # noqa: BLE001 - report whatever failed, then the logs
        print(f"smoke: FAILED: {e}", file=sys.stderr)
        logs = subprocess.run(["docker", "logs", srv_name], capture_output=True, text=True)
        print(f"--- docker logs {srv_name} ---\n{logs.stdout}{logs.stderr}", file=sys.stderr)
    finally:
        for name in (srv_name, pg_name):
            docker("rm", "--force", "--volumes", name, check=False)
    print("smoke: passed" if ok else "smoke: failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
