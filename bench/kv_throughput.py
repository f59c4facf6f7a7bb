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
(PullResponse.seconds) is kept too. The first round checks the pulled bytes. Writes JSON and a
PNG to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLS = {"cpu": "tcp,self,sm", "cuda": "tcp,sm,self,cuda_copy,cuda_ipc"}
PATHS = ("kvstore local", "kvstore UCX", "raw copy", "raw UCX")
RAW_OF = {"kvstore local": "raw copy", "kvstore UCX": "raw UCX"}


# ---- the raw UCX receiver, a process of its own (UCX reads its variables once per process) ----------
def receive_forever(tls: str, device: str, nbytes: int) -> None:
    import torch

    from services.common.server import run_event_loop
    from services.kvstore.ucx_endpoints import Acceptor, recv_frame, send_frame, this_worker_address
    from services.kvstore.ucx_environment import configure_ucx_environment
    from services.kvstore.ucx_transfer import FIRST_RUN_TAG, _ucx_buffer

    configure_ucx_environment(tls, "127.0.0.1")
    landing = torch.empty(nbytes, dtype=torch.uint8, device=device)

    async def serve(connection) -> None:
        while not connection.closed:
            request = await recv_frame(connection)
            await connection.recv(_ucx_buffer(landing[: int(request["bytes"])]), FIRST_RUN_TAG)
            await send_frame(connection, {"ok": True})

    async def main() -> None:
        Acceptor(serve).start()
        print(this_worker_address(), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the bench closes our stdin

    run_event_loop(main())


# ---- the bench ----------------------------------------------------------------------------------
def start_daemon(node_id: str, tls: str, workdir: str) -> tuple[subprocess.Popen, str]:
    from services.launcher import free_port

    port = free_port()
    argv = [sys.executable, "-m", "services.kvstore", "--node-id", node_id, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--metrics-port", "-1", "--transfer-host", "127.0.0.1", "--ucx-tls", tls]
    argv += ["--host-tier-bytes", "0", "--prefix-store-bytes", "0"]
    log = open(os.path.join(workdir, f"kvstore-{node_id}.log"), "w")
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), f"127.0.0.1:{port}"


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


async def measure(args, workdir: str) -> dict:
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
    daemons = [start_daemon(node, tls, workdir) for node in ("A", "B")]
    peer = subprocess.Popen(
        [sys.executable, "-m", "bench.kv_throughput", "--receive", tls, args.device, str(nbytes)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pools: list[Pool] = []
    try:
        assert peer.stdout is not None
        peer_address = peer.stdout.readline().strip()
        configure_ucx_environment(tls, "127.0.0.1")
        connections = ConnectionPool(connect_timeout=30.0)
        source = Pool(layout, args.device, daemons[0][1], "source")
        local = Pool(layout, args.device, daemons[0][1], "destination-a")
        remote = Pool(layout, args.device, daemons[1][1], "destination-b")
        pools = [source, local, remote]
        for pool in pools:
            await pool.register()
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
            await runs[name]()
        await pull(local)
        await pull(remote)
        synchronize(args.device)
        assert torch.equal(local.rows, source.rows) and torch.equal(remote.rows, source.rows)
        trials: dict[str, list[dict]] = {name: [] for name in PATHS}
        order = list(PATHS)
        from tqdm import tqdm

        for _ in tqdm(range(args.rounds), desc=f"{nbytes / 2**20:.0f} MiB transfers", unit="round"):
            for name in order:
                wall, own = await runs[name]()
                trials[name].append({"seconds": wall, "own_seconds": own, "gb_per_s": nbytes / wall / 1e9})
            order.reverse()
        await connections.close_idle(everything=True)
    finally:
        for pool in pools:
            await pool.close()
        if peer.stdin is not None:
            peer.stdin.close()
        for proc in [peer] + [d for d, _ in daemons]:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = {name: statistics.median(t["gb_per_s"] for t in trials[name]) for name in PATHS}
    ratios = {
        name: statistics.median(
            k["gb_per_s"] / r["gb_per_s"] for k, r in zip(trials[name], trials[RAW_OF[name]], strict=True)
        )
        for name in RAW_OF
    }
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "this machine's CPU",
        "ucx_tls": tls,
        "bytes": nbytes,
        "block_bytes": layout.block_bytes,
        "rounds": args.rounds,
        "gb_per_s": summary,
        "over_raw": ratios,
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
        receive_forever(argv[1], argv[2], int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--mib", type=int, default=0, help="bytes per transfer (default: 64 MiB on cpu, 1024 on cuda)")
    ap.add_argument("--block-kib", type=int, default=256, help="KV block size (a multiple of 32 KiB)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ucx-tls", default="", help=f"UCX transports (default: {TLS})")
    ap.add_argument("--out", default="results/kv-throughput")
    args = ap.parse_args(argv)
    args.mib = args.mib or (1024 if args.device == "cuda" else 64)
    if args.block_kib % 32:
        ap.error("--block-kib: a multiple of 32")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdserve-kv-throughput-") as workdir:
        results = asyncio.run(measure(args, workdir))
    for name in PATHS:
        ratio = f"  ({results['over_raw'][name]:.2f}x {RAW_OF[name]})" if name in RAW_OF else ""
        print(f"{name:14s} {results['gb_per_s'][name]:8.2f} GB/s{ratio}")
    with open(os.path.join(args.out, "kv-throughput.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "kv-throughput.png"))
    print(f"wrote {args.out}/kv-throughput.json and kv-throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
