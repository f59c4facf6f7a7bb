"""Prometheus metrics of one kvstore daemon (own registry: several daemons fit in one process)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import TRANSFER_LATENCY_BUCKETS

from .prefix_store import PrefixStore

# label values of `path`: as in PullResponse.path, and "prefix" / "prefix-ucx" (FetchPrefix, from
# this node's prefix tier / another node's)
PATHS = ("local", "ucx", "host", "prefix", "prefix-ucx")
# the failure reasons seen in practice, pre-created at zero; others still appear when they occur
FAILURE_REASONS = ("not_found", "unavailable", "deadline_exceeded", "failed_precondition", "internal")


class KvStoreMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.transferred_bytes = Counter(
            "pdserve_kvstore_transferred_bytes_total",
            "KV bytes written into this node's pools by pulls, by where they came from.",
            ["path"],
            registry=registry,
        )
        self.served_bytes = Counter(
            "pdserve_kvstore_served_bytes_total",
            "KV bytes this daemon sent over UCX to other nodes' daemons.",
            registry=registry,
        )
        self.transfer_duration = Histogram(
            "pdserve_kvstore_transfer_duration_seconds",
            "Time of one successful pull, from request to data in the destination pool.",
            ["path"],
            buckets=TRANSFER_LATENCY_BUCKETS,
            registry=registry,
        )
        self.pulls = Counter("pdserve_kvstore_pulls_total", "Successful pulls, by path.", ["path"], registry=registry)
        self.failures = Counter(
            "pdserve_kvstore_transfer_failures_total",
            "Failed pulls, by reason (the gRPC status name, lower case).",
            ["reason"],
            registry=registry,
        )
        self.ttl_moves = Counter(
            "pdserve_kvstore_ttl_moves_total",
            "Entries copied into the host tier because nobody pulled them within the TTL.",
            registry=registry,
        )
        self.expired = Counter(
            "pdserve_kvstore_expired_entries_total",
            "Entries dropped because nobody pulled them in time (host TTL).",
            registry=registry,
        )
        self.evicted = Counter(
            "pdserve_kvstore_host_evictions_total",
            "Host-tier entries dropped to make room for newer ones.",
            registry=registry,
        )
        self.entries = Gauge(
            "pdserve_kvstore_entries",
            "KV entries held, by tier (device: in a worker's pool; host).",
            ["tier"],
            registry=registry,
        )
        self.host_tier_bytes = Gauge(
            "pdserve_kvstore_host_tier_bytes", "Bytes of the host-memory tier in use.", registry=registry
        )
        self.pools = Gauge("pdserve_kvstore_pools", "Registered worker pools.", registry=registry)
        self.prefix_offered = Counter(
            "pdserve_kvstore_prefix_offered_blocks_total",
            "Blocks workers offered to the prefix tier: stored, or present already.",
            ["outcome"],
            registry=registry,
        )
        self.prefix_fetched = Counter(
            "pdserve_kvstore_prefix_fetched_blocks_total",
            "Blocks copied from the prefix tier into a worker's pool.",
            registry=registry,
        )
        self.prefix_evicted = Counter(
            "pdserve_kvstore_prefix_evicted_blocks_total",
            "Prefix-tier blocks dropped for newer ones (least recently used first).",
            registry=registry,
        )
        self.prefix_blocks = Gauge("pdserve_kvstore_prefix_blocks", "Blocks in the prefix tier.", registry=registry)
        self.prefix_bytes = Gauge(
            "pdserve_kvstore_prefix_bytes", "Host-memory bytes of the prefix tier's blocks.", registry=registry
        )
        for outcome in ("stored", "present"):
            self.prefix_offered.labels(outcome)
        for path in PATHS:  # so that every series exists from the start (rate() needs a zero)
            self.transferred_bytes.labels(path)
            self.pulls.labels(path)
            self.transfer_duration.labels(path)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    def bind_state(
        self,
        entries: Callable[[str], int],
        host_bytes: Callable[[], int],
        pools: Callable[[], int],
        prefix: PrefixStore,
    ) -> None:
        """Gauges read the daemon's state when scraped (nothing to keep in sync)."""
        self.prefix_blocks.set_function(lambda: prefix.num_blocks)
        self.prefix_bytes.set_function(lambda: prefix.used_bytes)
        for tier in ("device", "host"):
            self.entries.labels(tier).set_function(partial(entries, tier))
        self.host_tier_bytes.set_function(host_bytes)
        self.pools.set_function(pools)
