"""KV throughput through the kvstore against raw copies of the same bytes, side by side (issue 16).

    python -m bench.kv_throughput                   # CPU pools in /dev/shm, UCX over tcp,sm,self
    python -m bench.kv_throughput --device cuda     # GPU pools (CUDA IPC), UCX over cuda_ipc

Two kvstore daemons run on this machine (nodes A and B). A source pool is registered with A and
two destination pools of the same size, one with A and one with B. Each round publishes the source
blocks (--mib MiB in --block-kib KiB blocks, one contiguous run) and pulls them, through the
kvstore and raw, the four in turn (the order reversed every round, so all see the same machine):
- kvstore, same node: a Pull on A into its destination pool (the daemon copies pool to pool);
- kvstore, UCX: a Pull on B, whose daemon fetches the blocks from A's over UCX;
- raw copy: the same bytes copied pool to pool in this process (torch), what a local pull does
  without the protocol around it;
- raw UCX: the same bytes sent from the source pool to a buffer in another process (ucxx, the
  daemons' transports) with one frame before and an acknowledgement after.
GB/s is bytes over the wall time of the Pull RPC (what a decode worker waits for) or of the raw
transfer; ratios are medians of per-round ratios. The daemons' own timing of each pull
(PullResponse.seconds, without the RPC) gives a second ratio. A warm-up round checks the pulled
bytes. Writes JSON and a PNG to --out, and the daemons' and the receiver's logs to --out/logs,
where UCX names the protocol it chose for each transfer (UCX_PROTO_INFO=y: on a GPU, look for
cuda_ipc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLS = {"cpu": "tcp,self,sm", "cuda": "tcp,sm,self,cuda_copy,cuda_ipc"}
PATHS = ("kvstore local", "kvstore UCX", "raw copy", "raw UCX")
RAW_OF = {"kvstore local": "raw copy", "kvstore UCX": "raw UCX"}


# ---- the raw UCX receiver, a process of its own (UCX reads its variables once per process) ----------
def receive_forever(tls: str, device: str, nbytes: int, address_file: str) -> None:
    import torch

    from services.common.server import run_event_loop
    from services.kvstore.ucx_endpoints import Acceptor, RequestWaiter, recv_frame, send_frame, this_worker_address
    from services.kvstore.ucx_environment import configure_ucx_environment
    from services.kvstore.ucx_transfer import FIRST_RUN_TAG, _ucx_buffer

    configure_ucx_environment(tls, "127.0.0.1")
    landing = torch.empty(nbytes, dtype=torch.uint8, device=device)
    waiter = RequestWaiter(idle_seconds=3600.0)  # (recv_frame alone would spin between requests, as in a daemon)

    async def serve(connection) -> None:
        while await waiter.next_request(connection):
            request = await recv_frame(connection)
            await connection.recv(_ucx_buffer(landing[: int(request["bytes"])]), FIRST_RUN_TAG)
            synchronize(device)  # (as a daemon does before it answers a pull)
            await send_frame(connection, {"ok": True})

    async def main() -> None:
        Acceptor(serve).start()
        with open(address_file + ".tmp", "w") as f:
            f.write(this_worker_address())
        os.rename(address_file + ".tmp", address_file)
        await asyncio.to_thread(sys.stdin.read)  # until the bench closes our stdin

    run_event_loop(main())


# ---- the bench ----------------------------------------------------------------------------------
STARTUP_SECONDS = 120.0
UCX_LOGGED = dict(os.environ, UCX_PROTO_INFO="y")  # each process logs the protocols UCX picks


def start(argv: list[str], log_path: str, **kwargs) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, cwd=ROOT, env=UCX_LOGGED, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def start_daemon(node_id: str, tls: str, logs: str) -> tuple[subprocess.Popen, str]:
    from services.launcher import free_port

    port = free_port()
    argv = [sys.executable, "-m", "services.kvstore", "--node-id", node_id, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--metrics-port", "-1", "--transfer-host", "127.0.0.1", "--ucx-tls", tls]
    argv += ["--host-tier-bytes", "0", "--prefix-store-bytes", "0"]
    return start(argv, os.path.join(logs, f"kvstore-{node_id}.log")), f"127.0.0.1:{port}"


async def within_startup(what, procs: list[subprocess.Popen], logs: str):
    """`what` (a coroutine) once done, unless a process exits first or it takes STARTUP_SECONDS."""
    task = asyncio.ensure_future(what)
    deadline = time.monotonic() + STARTUP_SECONDS
    while not task.done():
        if any(proc.poll() is not None for proc in procs) or time.monotonic() > deadline:
            task.cancel()
            raise RuntimeError(f"a process of the bench exited or did not start; see {logs}")
        await asyncio.wait([task], timeout=0.2)
    return task.result()


async def read_when_written(path: str) -> str:
    while not os.path.exists(path):
        await asyncio.sleep(0.05)
    with open(path) as f:
        return f.read().strip()


class Pool:
    """A worker's pool as the daemons see it, registered with one of them."""

    def __init__(self, layout, device: str, daemon: str, name: str):
        from services.engine.kv_cache import InstanceKv, KvPool
        from services.kvstore.client import KvStoreClient

        self.name = name
        self.pool = KvPool.allocate(layout, device)
        self.rows = self.pool.block_bytes_view()
        self.instance = InstanceKv(layout, (self.pool.descriptor,))
        self.client = KvStoreClient(daemon)

    async def register(self) -> None:
        await self.client.register_pool(self.name, self.instance, lambda *released: None, timeout=60.0)

    async def close(self) -> None:
        await self.client.close()
        self.pool.close()


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


async def measure(args, logs: str) -> dict:
    import torch

    from services.engine.kv_cache import KvLayout
    from services.kvstore.ucx_endpoints import ConnectionPool, recv_frame, send_frame
    from services.kvstore.ucx_environment import configure_ucx_environment
    from services.kvstore.ucx_transfer import FIRST_RUN_TAG, _ucx_buffer

    tls = args.ucx_tls or TLS[args.device]
    # block_bytes = 2 (K and V) x layers x block_size 16 x heads x head_dim 64 x 2 bytes = 4 KiB x layers x heads
    heads = 8
    layers = max(1, args.block_kib // (4 * heads))
    layout = KvLayout(
        num_blocks=max(1, args.mib * 1024 // args.block_kib),
        num_layers=layers,
        block_size=16,
        num_kv_heads=heads,
        head_dim=64,
        dtype="float16",
        model_id="kv-throughput",
    )
    nbytes = layout.num_blocks * layout.block_bytes
    blocks = list(range(layout.num_blocks))
    procs: list[subprocess.Popen] = []
    pools: list[Pool] = []
    try:
        daemons = [start_daemon(node, tls, logs) for node in ("A", "B")]
        procs += [proc for proc, _ in daemons]
        address_file = os.path.join(logs, "receiver-address")
        if os.path.exists(address_file):  # (an earlier run's)
            os.remove(address_file)
        receive = [sys.executable, "-m", "bench.kv_throughput", "--receive", tls, args.device, str(nbytes)]
        receive.append(address_file)
        procs.append(start(receive, os.path.join(logs, "receiver.log"), stdin=subprocess.PIPE))
        peer_address = await within_startup(read_when_written(address_file), procs, logs)
        configure_ucx_environment(tls, "127.0.0.1")
        connections = ConnectionPool(connect_timeout=30.0)
        source = Pool(layout, args.device, daemons[0][1], "source")
        local = Pool(layout, args.device, daemons[0][1], "destination-a")
        remote = Pool(layout, args.device, daemons[1][1], "destination-b")
        pools = [source, local, remote]
        for pool in pools:
            await within_startup(pool.register(), procs, logs)
        source.rows.copy_(torch.randint(0, 256, source.rows.shape, dtype=torch.uint8, device=args.device))
        synchronize(args.device)
        published = 0

        async def pull(destination: Pool) -> tuple[float, float]:
            nonlocal published
            published += 1
            handle = await source.client.publish(f"kv-{published}", blocks, num_tokens=len(blocks) * 16)
            started = time.perf_counter()
            response = await destination.client.pull(blocks, handle, timeout=600.0)
            seconds = time.perf_counter() - started
            assert response.bytes == nbytes, (response.path, response.bytes, nbytes)
            return seconds, response.seconds

        async def raw_copy() -> tuple[float, float]:
            synchronize(args.device)
            started = time.perf_counter()
            local.rows.copy_(source.rows)
            synchronize(args.device)
            seconds = time.perf_counter() - started
            return seconds, seconds

        async def raw_ucx() -> tuple[float, float]:
            connection, _ = await connections.acquire(peer_address)
            started = time.perf_counter()
            await send_frame(connection, {"bytes": nbytes})
            await connection.send(_ucx_buffer(source.rows.view(-1)), FIRST_RUN_TAG)
            assert (await recv_frame(connection)).get("ok")
            seconds = time.perf_counter() - started
            await connections.give_back(peer_address, connection)
            return seconds, seconds

        runs = {
            "kvstore local": lambda: pull(local),
            "kvstore UCX": lambda: pull(remote),
            "raw copy": raw_copy,
            "raw UCX": raw_ucx,
        }
        for name in PATHS:  # warm up (connections, first-call paths), and check the bytes
            for pool in (local, remote):
                pool.rows.zero_()
            synchronize(args.device)  # (before a daemon writes the same memory)
            await runs[name]()
        await pull(local)
        await pull(remote)
        synchronize(args.device)
        assert torch.equal(local.rows, source.rows) and torch.equal(remote.rows, source.rows)
        trials: dict[str, list[dict]] = {name: [] for name in PATHS}
        order = list(PATHS)
        for _ in tqdm(range(args.rounds), desc=f"{nbytes / 2**20:.0f} MiB transfers", unit="round"):
            for name in order:
                wall, own = await runs[name]()
                trials[name].append({"seconds": wall, "own_seconds": own, "gb_per_s": nbytes / wall / 1e9})
            order.reverse()
        await connections.close_idle(everything=True)
    finally:
        for pool in pools:
            await pool.close()
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = {name: statistics.median(t["gb_per_s"] for t in trials[name]) for name in PATHS}

    def over_raw(name: str, seconds: str) -> float:  # per round: raw's seconds over the kvstore's
        pairs = zip(trials[name], trials[RAW_OF[name]], strict=True)
        return statistics.median(raw["seconds"] / kvstore[seconds] for kvstore, raw in pairs)

    ratios = {name: over_raw(name, "seconds") for name in RAW_OF}
    # the daemons' own timing of the pull, without the Pull RPC around it
    ratios_own = {name: over_raw(name, "own_seconds") for name in RAW_OF}
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "this machine's CPU",
        "ucx_tls": tls,
        "bytes": nbytes,
        "block_bytes": layout.block_bytes,
        "rounds": args.rounds,
        "gb_per_s": summary,
        "over_raw": ratios,
        "over_raw_daemon_timing": ratios_own,
        "trials": trials,
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [results["gb_per_s"][name] for name in PATHS]
    ax.bar(PATHS, values, color=["C0", "C1", "C7", "C7"])
    for i, name in enumerate(PATHS[:2]):
        ax.annotate(f"{results['over_raw'][name]:.2f}x raw", (i, values[i]), ha="center", va="bottom")
    ax.set_ylabel("GB/s")
    ax.set_title(
        f"KV through the kvstore against raw copies, {results['bytes'] / 2**20:.0f} MiB per transfer\n"
        f"measured on {results['device_name']} (UCX_TLS {results['ucx_tls']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--receive"]:
        receive_forever(argv[1], argv[2], int(argv[3]), argv[4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--mib", type=int, default=0, help="bytes per transfer (default: 64 MiB on cpu, 1024 on cuda)")
    ap.add_argument("--block-kib", type=int, default=256, help="KV block size (a multiple of 32 KiB, <= --mib)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ucx-tls", default="", help=f"UCX transports (default: {TLS})")
    ap.add_argument("--out", default="results/kv-throughput")
    args = ap.parse_args(argv)
    args.mib = args.mib or (1024 if args.device == "cuda" else 64)
    if args.block_kib < 32 or args.block_kib % 32 or args.block_kib > args.mib * 1024:
        ap.error("--block-kib: a multiple of 32, at most --mib MiB")
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    results = asyncio.run(measure(args, logs))
    for name in PATHS:
        ratio = ""
        if name in RAW_OF:
            own = results["over_raw_daemon_timing"][name]
            ratio = f"  ({results['over_raw'][name]:.2f}x {RAW_OF[name]}; {own:.2f}x by the daemon's own timing)"
        print(f"{name:14s} {results['gb_per_s'][name]:8.2f} GB/s{ratio}")
    print(f"UCX's protocol choices are in {logs}/ (UCX_PROTO_INFO)")
    with open(os.path.join(args.out, "kv-throughput.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "kv-throughput.png"))
    print(f"wrote {args.out}/kv-throughput.json and kv-throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
