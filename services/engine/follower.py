"""The ranks of an instance on a pod other than its worker's: `python -m services.engine.follower
--leader HOST:PORT --pod J` (engine/parallel.py).

It connects to the worker's rendezvous address (retrying until the worker listens: pods start in
any order), says which pod it is, and gets the instance's model folder and configuration (the
model must be at the same path here). It starts the pod's ranks, pod J holding ranks
J*n..J*n+n-1 of n per pod, on cuda:0..n-1 of this pod (or the CPU), and relays each frame rank 0
sends (a pass's pickled inputs) to their stdin. It serves nothing else.

It ends with the instance: when the worker's connection ends it stops its ranks and exits 1 (under
Kubernetes its pod restarts and joins the worker's next incarnation); when one of its ranks exits,
it exits 1, closing the connection, and the worker stops too. A stop frame from rank 0 (a clean
shutdown) is passed on, and it exits 0 once its ranks have; so does SIGTERM (its instance is being
stopped: the worker first, by `pdserve up` and by Kubernetes deleting the instance's pods).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from services.common.tls import DEFAULT_SERVER_NAME, TlsFiles, socket_context

from .parallel import read_frame, start_pod_ranks, write_frame

log = logging.getLogger("follower")

STOP = pickle.dumps(None, protocol=pickle.HIGHEST_PROTOCOL)
RETRY_SECONDS = (0.5, 5.0)  # first, longest wait between connection attempts


def connect(leader: str, tls: TlsFiles | None) -> socket.socket:
    """A connection to the worker (TLS with the cluster's certificates when given), once it listens."""
    host, _, port = leader.rpartition(":")
    context = socket_context(tls, server=False) if tls is not None else None
    delay = RETRY_SECONDS[0]
    while True:
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            if context is None:
                return sock
            assert tls is not None
            return context.wrap_socket(sock, server_hostname=tls.server_name)
        except ssl.SSLCertVerificationError:
            raise  # not a worker of this cluster: retrying will not change that
        except OSError as e:
            log.info("worker at %s not reachable (%s): retrying in %.1f s", leader, e, delay)
        time.sleep(delay)
        delay = min(2 * delay, RETRY_SECONDS[1])


def run(leader: str, pod: int, tls: TlsFiles | None = None) -> int:
    sock = connect(leader, tls)
    write_frame(sock, json.dumps({"pod": pod}).encode())
    reply = read_frame(sock)
    if reply is None:
        log.error("the worker at %s refused pod %d (it has no such pod, or another follower is it)", leader, pod)
        return 1
    sock.settimeout(None)
    spec = json.loads(reply)
    config = spec["config"]
    per_pod = config["tensor_parallel"] * config["pipeline_parallel"] // config["pods"]
    first = pod * per_pod
    threads = max(1, len(os.sched_getaffinity(0)) // per_pod)
    host = leader.rpartition(":")[0].strip("[]")
    ranks = start_pod_ranks(
        {**spec, "store_host": host, "threads": threads}, range(first, first + per_pod), first_on_pod=first
    )
    log.info("pod %d: ranks %d-%d started (pids %s)", pod, first, first + per_pod - 1, [r.pid for r in ranks])
    stopping = threading.Event()

    def watch(rank: subprocess.Popen) -> None:
        code = rank.wait()
        if not stopping.is_set():
            log.critical("rank (pid %d) exited with %s: stopping this pod's part of the instance", rank.pid, code)
            logging.shutdown()
            os._exit(1)

    for rank in ranks:
        threading.Thread(target=watch, args=(rank,), daemon=True).start()

    def terminate(signum, frame) -> None:
        stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    try:
        while (frame := read_frame(sock)) is not None:
            if frame == STOP:
                stopping.set()
            for rank in ranks:
                assert rank.stdin is not None
                rank.stdin.write(frame)
                rank.stdin.flush()
            if stopping.is_set():
                for rank in ranks:
                    rank.wait()
                return 0
        log.warning("the worker at %s is gone: stopping this pod's ranks", leader)
    except (OSError, ConnectionError) as e:
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
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        parser.add_argument(flag, default="", help="the cluster's TLS files, as the worker has them (mutual TLS)")
    parser.add_argument(
        "--tls-server-name", default=DEFAULT_SERVER_NAME, help="the name the worker's certificate carries"
    )
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 prints where every thread is
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s follower-pod-{args.pod} %(levelname)s %(message)s")
    sys.exit(run(args.leader, args.pod, TlsFiles.from_args(args)))


if __name__ == "__main__":
    main()
