"""The rendezvous of an instance over several pods (engine/parallel.py): the worker hands its spec
only to the followers it waits for, and a peer that is not one (junk, a frame claiming to be huge,
a pod it is not waiting for, a second claim to a pod already taken) is dropped without stopping the
wait; frames of a pass's inputs carry JSON, never pickles."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

from services.engine.parallel import STOP, Ranks, read_frame, write_frame
from services.engine.runner import ForwardInputs


def _peer(port: int, send: bytes, replies: list, index: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(send)
        try:
            replies[index] = read_frame(sock)
        except OSError:
            replies[index] = None
        if replies[index] is not None:
            sock.recv(1)  # a follower that joined keeps its connection until the test ends


def _hello(pod: object) -> bytes:
    body = json.dumps({"pod": pod}).encode()
    return struct.pack("!Q", len(body)) + body


def test_only_the_awaited_followers_get_the_spec():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ranks = Ranks([], threads_before=1)
    spec = {"model_dir": "/models/x", "config": {"pods": 3}, "store_port": port + 1}
    peers = [
        b"not a frame at all",  # junk: its "length" is absurd
        struct.pack("!Q", 1 << 40),  # claims a huge hello
        _hello(7),  # a pod the instance does not have
        _hello("1"),  # not an integer
        _hello(1),
        _hello(1),  # pod 1 again, once taken
        _hello(2),
    ]
    replies: list = [b"unset"] * len(peers)
    done = threading.Event()

    def accept() -> None:
        ranks._accept_followers(listener, 3, spec, tls=None)
        done.set()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        for i, send in enumerate(peers):  # one after another: the order decides who is pod 1
            threading.Thread(target=_peer, args=(port, send, replies, i), daemon=True).start()
            deadline = time.monotonic() + 15
            while replies[i] == b"unset":
                assert time.monotonic() < deadline, f"peer {i} got no answer"
                time.sleep(0.01)
        assert done.wait(30), "the worker still waits for its followers"
        joined = [i for i, r in enumerate(replies) if r not in (None, b"unset")]
        assert joined == [4, 6] and all(json.loads(replies[i]) == spec for i in joined)
        assert len(ranks.followers) == 2
    finally:
        ranks._closing = True  # the watchers would stop the process when the test closes the sockets
        for follower in ranks.followers:
            follower.close()
        listener.close()


def test_a_pass_travels_as_json_and_stop_is_its_own_frame():
    inputs = ForwardInputs(
        "mixed",
        ["a", "b"],
        [5, 6, 7],
        [3, 0, 1],
        [19, 32, 33],
        ["gone"],
        cu_seqlens=[0, 1, 3],
        logits_rows=[0, 2],
        block_tables=[[1]],
        context_lens=[4],
        decode_rows=[0],
        chunks=[(1, 2, 0, [2])],
    )
    a, b = socket.socketpair()
    with a, b:
        write_frame(a, inputs.to_bytes())
        write_frame(a, STOP)
        frame = read_frame(b)
        assert frame is not None and frame.startswith(b"{")  # JSON: nothing a peer sends is executed
        back = ForwardInputs.from_bytes(frame)
        assert back.chunks == [[1, 2, 0, [2]]] and back.seq_ids == inputs.seq_ids and back.slots == inputs.slots
        assert read_frame(b) == STOP
