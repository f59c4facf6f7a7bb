"""A stranger to the kvstore daemons, speaking UCX to them from its own process (a test process
must not start UCX itself: its variables are read once per process).

    python -m tests.ucx_peer dead-address          # prints the address of a worker that then exits
    python -m tests.ucx_peer abandon ADDRESS JSON  # asks for an entry, takes the reply, leaves it
                                                   # (and stays until its stdin closes)
    python -m tests.ucx_peer garbage ADDRESS       # hellos a daemon must survive
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import numpy as np

from services.kvstore.ucx_endpoints import (
    HELLO_TAG,
    ConnectionPool,
    address_text,
    endpoint_to,
    parse_address,
    recv_frame,
    send_frame,
    this_worker_address,
)
from services.kvstore.ucx_environment import configure_ucx_environment


async def abandon(address: str, fetch: dict) -> None:
    """A pull cancelled once the source has started sending: the connection is dropped."""
    pool = ConnectionPool(connect_timeout=5.0)
    connection, _ = await pool.acquire(address)
    await send_frame(connection, {"op": "fetch", **fetch})
    reply = await recv_frame(connection)
    assert reply.get("ok"), reply
    await pool.discard(connection)
    print("abandoned", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # alive: the source learns of it from the goodbye alone


async def garbage(address: str) -> None:
    ep = await endpoint_to(parse_address(address))
    own_text = this_worker_address()
    own = parse_address(own_text)
    wrong_version = bytes([own[0] ^ 0x0F]) + own[1:]
    corrupted = bytearray(base64.urlsafe_b64decode(own_text[4:]))
    corrupted[-1] ^= 0xFF
    hellos = [
        b"not json",
        b"[1, 2]",
        json.dumps({"connection": 1}).encode(),
        json.dumps({"connection": -1, "reply_to": this_worker_address()}).encode(),
        json.dumps({"connection": 2, "reply_to": "10.0.0.1:7101"}).encode(),
        json.dumps({"connection": 3, "reply_to": "ucx:" + base64.urlsafe_b64encode(b"\x07" * 200).decode()}).encode(),
        json.dumps({"connection": 4, "reply_to": address_text(wrong_version)}).encode(),
        json.dumps({"connection": 5, "reply_to": address_text(own[:16])}).encode(),  # cut, yet "valid"
        json.dumps({"connection": 6, "reply_to": own_text[:40]}).encode(),  # cut
        json.dumps({"connection": 7, "reply_to": "ucx:" + base64.urlsafe_b64encode(corrupted).decode()}).encode(),
        b"x" * (1 << 17),  # over the hello size limit
    ]
    for hello in hellos:
        await ep.send(np.frombuffer(hello, dtype=np.uint8), tag=HELLO_TAG, force_tag=True)
    await asyncio.sleep(0.5)
    await ep.close()
    print("sent", len(hellos), flush=True)


def main(argv: list[str]) -> None:
    configure_ucx_environment("", "127.0.0.1")
    if argv[0] == "dead-address":
        print(this_worker_address(), flush=True)
    elif argv[0] == "abandon":
        asyncio.run(abandon(argv[1], json.loads(argv[2])))
    elif argv[0] == "garbage":
        asyncio.run(garbage(argv[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
