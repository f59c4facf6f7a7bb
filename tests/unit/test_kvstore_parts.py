"""Unit tests of the kvstore's pure pieces: block runs, host-tier accounting, the entry table."""

import asyncio
import ipaddress
import os
import threading

import grpc
import pytest
import torch

from services.common.errors import ServiceError
from services.engine.kv_cache import KvLayout, KvPool
from services.kvstore.block_runs import CopyStopped, RankRows, contiguous_runs, copy_blocks, copy_pieces
from services.kvstore.daemon import copy_until_cancelled
from services.kvstore.entries import EntryTable
from services.kvstore.host_tier import HostTier
from services.kvstore.shards import instance_shards, resharding_plan
from services.kvstore.ucx_endpoints import address_text, parse_address
from services.kvstore.ucx_environment import configure_ucx_environment, interface_addresses, interface_of
from services.kvstore.ucx_transfer import check_runs
from tests.proc_sockets import ipv4_addresses

LAYOUT = KvLayout(num_blocks=16, num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype="float32", model_id="t")


# ---- block runs ---------------------------------------------------------------------------------
def test_runs_are_contiguous_on_both_sides():
    src = [3, 4, 5, 10, 11, 40, 2]
    dst = [60, 61, 0, 1, 2, 30, 31]
    # 3,4 -> 60,61 | 5 -> 0 (dst continues 0,1,2 but src jumps to 10) | 10,11 -> 1,2 | 40 -> 30 | 2 -> 31
    assert contiguous_runs(src, dst, block_bytes=1) == [(0, 2), (2, 1), (3, 2), (5, 1), (6, 1)]


def test_runs_split_at_the_size_cap():
    assert contiguous_runs(list(range(10)), list(range(10)), block_bytes=100, max_run_bytes=400) == [
        (0, 4),
        (4, 4),
        (8, 2),
    ]


def test_runs_need_equal_lengths():
    with pytest.raises(ValueError):
        contiguous_runs([1, 2], [1], block_bytes=1)


def test_copy_blocks_moves_each_block_to_its_place():
    src = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
    dst = torch.zeros((8, 16), dtype=torch.uint8)
    assert copy_blocks(src, [1, 2, 7], dst, [4, 5, 0]) == 3 * 16
    assert torch.equal(dst[[4, 5, 0]], src[[1, 2, 7]])
    assert dst[[1, 2, 3, 6, 7]].sum() == 0


def test_copy_blocks_stops_between_runs():
    src = torch.arange(4 * 8, dtype=torch.uint8).view(4, 8)
    dst = torch.zeros(8, 8, dtype=torch.uint8)
    stop = threading.Event()
    stop.set()
    with pytest.raises(CopyStopped):
        copy_blocks(src, [0, 1, 2, 3], dst, [0, 2, 4, 6], stop)
    assert not dst.any()


def test_a_cancelled_local_copy_has_stopped_writing_when_the_cancellation_returns():
    """The daemon's Pull handler is cancelled when the puller's deadline passes: by the time the
    CancelledError leaves copy_until_cancelled, nothing writes into the destination any more (it
    used to keep copying in its thread while the decode worker reused the blocks)."""
    blocks = 4000
    layout = KvLayout(2 * blocks, 1, 1, 1, 4096, "float32")  # 32 KiB blocks
    src = torch.ones(blocks, layout.block_bytes, dtype=torch.uint8)
    dst = torch.zeros(2 * blocks, layout.block_bytes, dtype=torch.uint8)
    dst_ids = list(range(0, 2 * blocks, 2))  # every other block: 4000 separate runs
    (shard,) = instance_shards(layout, 1, 1)
    whole = resharding_plan([shard], [shard])

    async def cancel_midway():
        source, target = [RankRows(src, list(range(blocks)), shard)], [RankRows(dst, dst_ids, shard)]
        task = asyncio.ensure_future(copy_until_cancelled(source, target, whole, layout))
        await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        written = int(dst[:, 0].sum())
        await asyncio.sleep(0.05)
        return written, int(dst[:, 0].sum())

    at_return, later = asyncio.run(cancel_midway())
    assert at_return == later, "the copy went on after the cancellation returned"
    assert at_return < blocks, "cancelled 2 ms into a copy of 4000 runs, it should have stopped early"


def test_check_runs_rejects_a_source_that_does_not_tile_the_destination():
    dst = [5, 6, 9]
    assert check_runs([[0, 2], [2, 1]], dst) == [(0, 2), (2, 1)]
    with pytest.raises(ValueError):
        check_runs([[0, 3]], dst)  # 6 -> 9 is not contiguous
    with pytest.raises(ValueError):
        check_runs([[0, 2]], dst)  # leaves a block out
    with pytest.raises(ValueError):
        check_runs([[1, 2]], dst)  # does not start at 0


def test_a_transfer_address_is_a_ucx_worker_address_in_base64_checked_by_length_and_crc():
    address = bytes(range(256)) * 2
    text = address_text(address)
    assert text.startswith("ucx:") and parse_address(text) == address
    corrupted = text[:-6] + ("AAAA" if text[-6:-2] != "AAAA" else "BBBB") + text[-2:]
    cut = address_text(address)[:40]
    for bad in ["10.0.0.1:7101", "ucx:", "ucx:not base64!", "ucx:" + "A" * 20000, corrupted, cut]:
        with pytest.raises(ServiceError) as e:
            parse_address(bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "handle.transfer_address" in e.value.message, bad


def test_ucx_listens_on_the_interface_of_the_transfer_host(monkeypatch):
    for name in ("UCX_TLS", "UCX_NET_DEVICES", "UCX_TCP_PORT_RANGE", "UCX_WARN_UNUSED_ENV_VARS"):
        monkeypatch.setenv(name, "")  # (so that monkeypatch restores what was there, or nothing)
        monkeypatch.delenv(name)
    assert interface_of("127.0.0.1") == interface_of("localhost") == "lo" and interface_of("192.0.2.254") == ""
    if ("lo", ipaddress.ip_address("::1")) in interface_addresses():  # (a machine with IPv6)
        assert interface_of("::1") == interface_of("[::1]") == "lo"
    listed = ipv4_addresses()  # every IPv4 address `ip` lists, secondary ones too, is found
    assert listed and all(interface_of(address) == name for name, address in listed), listed
    configure_ucx_environment("", "127.0.0.1", 7101)
    assert (os.environ["UCX_NET_DEVICES"], os.environ["UCX_TCP_PORT_RANGE"]) == ("lo", "7101-7116")
    for transports in ("rc,tcp,sm,self", "all", "^sm"):  # may use RDMA: its devices are the operator's
        monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
        configure_ucx_environment(transports, "127.0.0.1")
        assert "UCX_NET_DEVICES" not in os.environ, transports
    monkeypatch.setenv("UCX_NET_DEVICES", "eth7")
    configure_ucx_environment("tcp", "127.0.0.1")  # the operator's choice stands
    assert os.environ["UCX_NET_DEVICES"] == "eth7"


# ---- host tier ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_host_tier_evicts_oldest_idle_entries_first():
    clock = FakeClock()
    tier = HostTier(capacity_bytes=100, ttl_seconds=10, clock=clock)
    for name in ("a", "b", "c"):
        tier.allocate(name, num_blocks=3, block_bytes=10)
        clock.now += 1
    assert tier.used_bytes == 90
    assert tier.plan_admission(10, evictable=lambda kv: True) == []
    assert tier.plan_admission(30, evictable=lambda kv: True) == ["a"]
    assert tier.plan_admission(30, evictable=lambda kv: kv != "a") == ["b"]  # "a" is being read
    assert tier.plan_admission(101, evictable=lambda kv: True) is None  # never fits
    assert tier.plan_admission(80, evictable=lambda kv: kv == "c") is None  # not enough evictable
    tier.free("a")
    assert tier.used_bytes == 60 and "a" not in tier


def test_host_tier_expiry_is_oldest_first():
    clock = FakeClock()
    tier = HostTier(capacity_bytes=100, ttl_seconds=10, clock=clock)
    tier.allocate("a", 1, 10)
    clock.now = 5
    tier.allocate("b", 1, 10)
    clock.now = 12
    assert tier.expired() == ["a"]
    clock.now = 20
    assert tier.expired() == ["a", "b"]


# ---- entry table --------------------------------------------------------------------------------
@pytest.fixture
def table_and_pool():
    pool = KvPool.allocate(LAYOUT)
    table = EntryTable(HostTier(1 << 20, 60))
    record = table.add_pool("w", LAYOUT, instance_shards(LAYOUT, 1, 1), [pool])
    yield table, record
    pool.close()


@pytest.mark.parametrize(
    "kv_id, blocks, tokens, field",
    [
        ("", [1], 4, "kv_id"),
        ("x", [], 4, "block_ids"),
        ("x", [16], 4, "block_ids"),  # out of range
        ("x", [1, 1], 8, "block_ids"),  # twice
        ("x", [1, 2], 4, "num_tokens"),  # 4 tokens fit one block
        ("x", [1], 5, "num_tokens"),  # 5 tokens need two
        ("x", [1], 0, "num_tokens"),
    ],
)
def test_publish_validates_and_names_the_field(table_and_pool, kv_id, blocks, tokens, field):
    table, record = table_and_pool
    with pytest.raises(ServiceError) as e:
        table.publish(record.pool_id, kv_id, blocks, tokens)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith(field + ":")


def test_entries_may_share_blocks_but_not_ids(table_and_pool):
    """A prefix cached by the worker backs two requests' entries at once; each entry's release
    gives back its own blocks (the worker counts their owners)."""
    table, record = table_and_pool
    table.publish(record.pool_id, "a", [1, 2], 8)
    table.publish(record.pool_id, "b", [1, 3], 8)
    assert table.release("a", pool_id=record.pool_id) is True
    assert record.events.get_nowait().block_ids == [1, 2]
    assert "b" in table.entries
    with pytest.raises(ServiceError) as e:
        table.publish(record.pool_id, "b", [5], 1)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_release_during_a_transfer_waits_for_it(table_and_pool):
    table, record = table_and_pool

    async def scenario():
        entry = table.publish(record.pool_id, "a", [1, 2], 8)
        held = await table.begin_transfer("a", entry.access_token, entry.fingerprint, 2)
        assert table.release("a", entry.access_token) is True
        assert record.events.empty()  # blocks are still being read
        table.end_transfer(held, succeeded=False)
        event = record.events.get_nowait()
        assert (event.kv_id, event.block_ids, event.reason) == ("a", [1, 2], "released")
        assert table.release("a", entry.access_token) is False

    asyncio.run(scenario())


def test_only_the_handles_token_or_the_publishing_pool_may_pull_or_release(table_and_pool):
    """An entry's id is not a secret (it names the request); its access token is. A guessed id
    reads as no entry at all."""
    table, record = table_and_pool

    async def scenario():
        entry = table.publish(record.pool_id, "a", [1, 2], 8)
        assert len(entry.access_token) >= 32
        last = entry.access_token[-1]
        for token in ("", "guess", entry.access_token[:-1] + ("y" if last == "x" else "x")):  # one character off
            with pytest.raises(ServiceError) as e:
                await table.begin_transfer("a", token, entry.fingerprint, 2)
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            assert table.release("a", token) is False
        assert table.release("a", pool_id="someone-else-1234") is False
        assert "a" in table.entries
        assert table.release("a", pool_id=record.pool_id) is True  # its own worker
        other = table.publish(record.pool_id, "b", [3], 4)
        held = await table.begin_transfer("b", other.access_token, other.fingerprint, 1)
        table.end_transfer(held, succeeded=True)

    asyncio.run(scenario())


def test_second_pull_of_an_entry_finds_it_gone(table_and_pool):
    table, record = table_and_pool

    async def scenario():
        entry = table.publish(record.pool_id, "a", [1], 4)
        first = await table.begin_transfer("a", entry.access_token, entry.fingerprint, 1)
        second = asyncio.create_task(table.begin_transfer("a", entry.access_token, entry.fingerprint, 1))
        await asyncio.sleep(0)
        table.end_transfer(first, succeeded=True)
        with pytest.raises(ServiceError) as e:
            await second
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert record.events.get_nowait().reason == "pulled"

    asyncio.run(scenario())


def test_transfer_checks_fingerprint_and_block_count(table_and_pool):
    table, record = table_and_pool

    async def scenario():
        entry = table.publish(record.pool_id, "a", [1, 2], 8)
        with pytest.raises(ServiceError) as e:
            await table.begin_transfer("a", entry.access_token, "other-model:1x2:float32", 2)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ServiceError) as e:
            await table.begin_transfer("a", entry.access_token, entry.fingerprint, 3)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith("block_ids:")
        assert not entry.lock.locked()

    asyncio.run(scenario())


def test_dropping_a_pool_forgets_its_device_entries_but_keeps_host_ones(table_and_pool):
    table, record = table_and_pool
    table.publish(record.pool_id, "a", [1], 4)
    moved = table.publish(record.pool_id, "b", [2], 4)
    table.host.allocate("b", 1, LAYOUT.block_bytes)
    table.move_to_host(moved, torch.zeros((1, LAYOUT.block_bytes), dtype=torch.uint8))
    assert record.events.get_nowait().reason == "moved_to_host"
    assert table.drop_pool(record.pool_id) == 1
    assert list(table.entries) == ["b"] and table.count("host") == 1
    assert record.events.get_nowait() is None  # ends the watch stream


def test_a_failed_move_to_the_host_tier_gives_its_bytes_back(monkeypatch):
    """The TTL sweep copies an entry into the host tier; if that copy raises (here injected: CPU
    copies do not fail), the reserved host bytes are returned and the entry stays pullable on the
    device, so the next sweep can try again (or expire it after the host TTL)."""
    from prometheus_client import CollectorRegistry

    from services.kvstore import daemon as daemon_module

    daemon = daemon_module.KvStoreDaemon(daemon_module.KvStoreConfig(node_id="n", ttl_seconds=0.0), CollectorRegistry())
    pool = KvPool.allocate(LAYOUT)
    record = daemon.table.add_pool("w", LAYOUT, instance_shards(LAYOUT, 1, 1), [pool])
    daemon.table.publish(record.pool_id, "a", [1, 2], 8)

    def failing_copy(*args):
        raise OSError("copy failed")

    monkeypatch.setattr(daemon_module, "copy_pieces", failing_copy)
    asyncio.run(daemon.sweep())
    assert daemon.table.host.used_bytes == 0
    assert daemon.table.count("device") == 1 and daemon.table.count("host") == 0
    monkeypatch.setattr(daemon_module, "copy_pieces", copy_pieces)
    asyncio.run(daemon.sweep())  # the retry moves it
    assert daemon.table.count("host") == 1 and daemon.table.host.used_bytes == 2 * LAYOUT.block_bytes
    pool.close()


def test_the_transfer_ports_may_not_hold_the_other_ports(capsys):
    from services.kvstore.__main__ import parse_args

    assert parse_args(["--transfer-port", "7101", "--port", "7100", "--metrics-port", "7117"]).transfer_port == 7101
    for argv, said in [
        (["--transfer-port", "7101", "--port", "7116"], "--port 7116 is among --transfer-port's 7101-7116"),
        (["--transfer-port", "9100"], "--metrics-port 9100"),  # (its default)
        (["--transfer-port", "65530"], "--transfer-port: at most 65520"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert said in capsys.readouterr().err
