"""Receives the first transaction with changes from a pgdeltastream websocket, as a user
of Python `websockets` would: default settings, but for the message size limit (raised,
as docs/api.md says for large transactions). Acks it, closes normally, and prints a JSON
summary on stdout.

usage: receive_one.py WS_URL
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def main(url: str) -> None:
    async with connect(url, max_size=None) as ws:
        while True:
            message = json.loads(await ws.recv())
            if message.get("change"):
                break
        changes = message["change"]
        await ws.send(json.dumps({"lsn": message["nextlsn"]}))
        summary = {
            "changes": len(changes),
            "nextlsn": message["nextlsn"],
            "first": changes[0].get("columnvalues"),
            "last": changes[-1].get("columnvalues"),
        }
    print(json.dumps(summary), flush=True)


asyncio.run(main(sys.argv[1]))
