"""The ranks of an instance on a pod other than its worker's: `python -m services.engine.follower
--leader HOST:PORT --pod J` (engine/parallel.py).

It connects to the worker's rendezvous address (retrying until the worker listens and takes it:
pods start in any order), says which pod it is, and gets the instance's model folder and
configuration (the model must be at the same path here). It starts the pod's ranks, pod J holding
ranks J*n..J*n+n-1 of n per pod, on this pod's GPUs from `--device` (default cuda:0 when the
worker runs on CUDA; else the worker's device), and relays each frame rank 0 sends (a pass's
inputs as JSON, parallel.py) to their stdin. It serves nothing else.

It ends with the instance: when the worker's connection ends it stops its ranks and exits 1 (under
Kubernetes its pod restarts and joins the worker's next incarnation); when one of its ranks exits,
it exits 1, closing the connection, and the worker stops too. A stop frame from rank 0 (a clean
shutdown) is passed on, and it exits 0 once its ranks have. SIGTERM stops it at once with 0, unless
it was started with SIGTERM ignored (the Helm charts do: there the worker, draining, stops it).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from services.common.tls import DEFAULT_SERVER_NAME, TlsFiles, socket_context

from .config import EngineConfig
from .parallel import HELLO_TIMEOUT, STOP, config_fields, keepalive, read_frame, start_pod_ranks, write_frame

log = logging.getLogger("follower")

RETRY_SECONDS = (0.5, 2.0)  # first, longest wait between connection attempts (cheap: a TCP connect)


def join(leader: str, pod: int, tls: TlsFiles | None) -> tuple[socket.socket, dict]:
    """Connected to the worker (TLS with the cluster's certificates when given) and taken as `pod`:
    the socket and the instance's spec. Retries until then."""
    host, _, port = leader.rpartition(":")
    context = socket_context(tls, server=False) if tls is not None else None
    delay = RETRY_SECONDS[0]
    while True:
        try:
            sock = keepalive(socket.create_connection((host.strip("[]"), int(port)), timeout=HELLO_TIMEOUT))
            if context is not None:
                assert tls is not None
                sock = context.wrap_socket(sock, server_hostname=tls.server_name)
            write_frame(sock, json.dumps({"pod": pod}).encode())
            reply = read_frame(sock)
            if reply is not None:
                sock.settimeout(None)
                return sock, json.loads(reply)
            why = "it refused this pod (not waiting for it: another follower took it, or it has no such pod)"
            sock.close()
        except ssl.SSLCertVerificationError:
            raise  # not a worker of this cluster: retrying will not change that
        except (OSError, ValueError) as e:
            why = repr(e)
        log.info("cannot join the worker at %s (%s): retrying in %.1f s", leader, why, delay)
        time.sleep(delay)
        delay = min(2 * delay, RETRY_SECONDS[1])


def run(leader: str, pod: int, tls: TlsFiles | None = None, device: str = "") -> int:
    stopping = threading.Event()

    def terminate(signum, frame) -> None:
        stopping.set()
        raise SystemExit(0)

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, terminate)
    sock, spec = join(leader, pod, tls)
    config = spec["config"]
    if device or config["device"].startswith("cuda"):  # this pod's GPUs, not the worker's numbering
        config["device"] = device or "cuda:0"
    per_pod = EngineConfig(**config_fields(spec)).ranks_per_pod
    first = pod * per_pod
    threads = max(1, len(os.sched_getaffinity(0)) // per_pod)
    host = leader.rpartition(":")[0].strip("[]")
    ranks = start_pod_ranks(
        {**spec, "store_host": host, "threads": threads}, range(first, first + per_pod), first_on_pod=first
    )
    log.info("pod %d: ranks %d-%d started (pids %s)", pod, first, first + per_pod - 1, [r.pid for r in ranks])

    def watch(rank: subprocess.Popen) -> None:
        code = rank.wait()
        if not stopping.is_set():
            log.critical("rank (pid %d) exited with %s: stopping this pod's part of the instance", rank.pid, code)
            logging.shutdown()
            os._exit(1)

    for rank in ranks:
        threading.Thread(target=watch, args=(rank,), daemon=True).start()
    try:
        while (frame := read_frame(sock)) is not None:
            if frame == STOP:
                stopping.set()
            for rank in ranks:
                assert rank.stdin is not None
                write_frame(rank.stdin, frame)
            if stopping.is_set():
                for rank in ranks:
                    rank.wait()
                return 0
        log.warning("the worker at %s is gone: stopping this pod's ranks", leader)
    except (OSError, ValueError) as e:
        log.warning("connection to the worker failed: %r", e)
    finally:
        stopping.set()
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leader", required=True, help="the worker's rendezvous address (host:port)")
    parser.add_argument("--pod", required=True, type=int, help="which pod of the instance this is (1..pods-1)")
    parser.add_argument("--device", default="", help="this pod's first GPU, cuda:K (default: cuda:0 on CUDA)")
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        parser.add_argument(flag, default="", help="the cluster's TLS files, as the worker has them (mutual TLS)")
    parser.add_argument(
        "--tls-server-name", default=DEFAULT_SERVER_NAME, help="the name the worker's certificate carries"
    )
    args = parser.parse_args()
    faulthandler.enable()  # a native crash leaves the Python stacks in the log
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 prints where every thread is
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s follower-pod-{args.pod} %(levelname)s %(message)s")
    sys.exit(run(args.leader, args.pod, TlsFiles.from_args(args), args.device))


if __name__ == "__main__":
    main()
