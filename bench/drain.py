"""The bench's Python client: drains a slot through the server as a user of Python
`websockets` would (default settings but the message size limit, which a 300 MB
transaction needs raised), acking every transaction's nextlsn, until a nextlsn reaches
the workload's end. Prints one JSON line: changes, transactions, bytes, secs.

Usage: drain.py WS_URL END_LSN
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect


def parse_lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def nextlsn(message):
    head = message[:128]
    at = head.find('"nextlsn":"')
    if at < 0:
        return None
    start = at + len('"nextlsn":"')
    return head[start : head.index('"', start)]


async def drain(url, end):
    changes = transactions = size = 0
    started = time.monotonic()
    async with connect(url, max_size=None) as ws:
        async for message in ws:
            if isinstance(message, bytes):
                message = message.decode()
            lsn = nextlsn(message)
            if lsn is None:
                continue
            await ws.send(json.dumps({"lsn": lsn}))
            if parse_lsn(lsn) <= end:
                changes += message.count('"kind":"')
                transactions += 1
                size += len(message) if message.isascii() else len(message.encode())
            if parse_lsn(lsn) >= end:
                break
        finished = time.monotonic()
    return {"changes": changes, "transactions": transactions, "bytes": size, "secs": finished - started}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(drain(sys.argv[1], parse_lsn(sys.argv[2])))))
