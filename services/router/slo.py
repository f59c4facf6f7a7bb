"""Request latency metrics and SLO accounting, measured where the client sees them: the router.

Counters of finished requests, of requests meeting the TTFT SLO, the TPOT SLO, and both, make
attainment over any window a PromQL ratio of increases; a gauge also reports attainment over a
sliding window for dashboards without PromQL. The SLO in force is exported too. Each request is
judged against its own SLO (a per-request override, or the configured default).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.enums import FinishReason
from services.common.metrics import (
    RELAY_LATENCY_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
)


@dataclass
class RequestTimer:
    """Token timestamps of one request, from its arrival at the router."""

    arrived: float = field(default_factory=time.monotonic)
    first_token: float = 0.0
    last_token: float = 0.0
    num_tokens: int = 0
    compute_started: float = 0.0  # arrival + time queued before a worker began on it

    def tokens(self, n: int, now: float | None = None) -> float:
        """Records n tokens sent now; returns the gap since the previous token (0 for the first)."""
        now = now or time.monotonic()
        gap = 0.0 if self.num_tokens == 0 else now - self.last_token
        if self.num_tokens == 0:
            self.first_token = now
        self.last_token = now
        self.num_tokens += n
        return gap

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrived if self.num_tokens else 0.0

    @property
    def tpot(self) -> float:
        return (self.last_token - self.first_token) / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0

    @property
    def e2e(self) -> float:
        return (self.last_token or time.monotonic()) - self.arrived


class SloTracker:
    """The router's request metrics. Those a client sees (latencies, finished requests, SLO
    counters, tokens, requests in flight) carry an `api` label, "grpc" or "http": `of(api)` gives
    one API's view, which does the accounting."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ttft_slo: float,
        tpot_slo: float,
        window_seconds: float,
        attainment_target: float = 0.9,
        apis: tuple[str, ...] = ("grpc", "http"),
    ):
        self.ttft_slo = ttft_slo
        self.tpot_slo = tpot_slo
        self.window_seconds = window_seconds
        self._window: deque[tuple[float, bool, bool]] = deque()  # (finished at, ttft met, tpot met)
        r = registry
        api = ["api"]
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "Time to first token, per request, at the router.",
            api,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Time per output token after the first, per request: (t_last - t_first) / (n - 1).",
            api,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gaps between consecutive token messages to clients.",
            api,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.relay = Histogram(
            "pdserve_router_token_relay_seconds",
            "From a worker's message with a request's next tokens reaching the router to the router "
            "starting their message to the client: how long tokens wait at the router (for its loop, "
            "or for the client to take the message before).",
            api,
            buckets=RELAY_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Request arrival to last token.",
            api,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.router_overhead = Histogram(
            "pdserve_router_overhead_seconds",
            "TTFT less the worker's queue and compute: what the router and its calls to the worker added.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "pdserve_request_queue_time_seconds",
            "Time in the worker's queue before its prefill started (after a failover, summed).",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "pdserve_requests_total", "Finished requests by finish reason.", ["finish_reason", "api"], registry=r
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens_total", "Prompt tokens of finished requests.", api, registry=r
        )
        self.generation_tokens = Counter(
            "pdserve_generation_tokens_total", "Tokens generated for clients.", api, registry=r
        )
        self.prompt_len = Histogram(
            "pdserve_request_prompt_tokens", "Prompt length per request.", buckets=TOKEN_COUNT_BUCKETS, registry=r
        )
        self.output_len = Histogram(
            "pdserve_request_generation_tokens",
            "Generated tokens per request.",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.slo_requests = Counter(
            "pdserve_slo_requests_total", "Requests judged against their SLOs (finished normally).", api, registry=r
        )
        self.slo_ttft_met = Counter(
            "pdserve_slo_ttft_met_total", "Requests whose TTFT met their TTFT SLO.", api, registry=r
        )
        self.slo_tpot_met = Counter(
            "pdserve_slo_tpot_met_total", "Requests whose TPOT met their TPOT SLO.", api, registry=r
        )
        self.slo_met = Counter(
            "pdserve_slo_met_total", "Requests that met both SLOs (they count toward goodput).", api, registry=r
        )
        self.slo_target = Gauge("pdserve_slo_target_seconds", "The configured default SLOs.", ["slo"], registry=r)
        self.slo_target.labels("ttft").set(ttft_slo)
        self.slo_target.labels("tpot").set(tpot_slo)
        self.attainment_target = Gauge(
            "pdserve_slo_attainment_target_ratio",
            "Attainment the deployment aims for (alerts fire below it).",
            registry=r,
        )
        self.attainment_target.set(attainment_target)
        self.attainment = Gauge(
            "pdserve_slo_attainment_ratio",
            "Fraction of requests finished in the last window that met both SLOs (1 when none).",
            registry=r,
        )
        self.attainment.set_function(self.window_attainment)
        self.retries = Counter("pdserve_request_retries_total", "Failovers of requests to other workers.", registry=r)
        self.client_stalls = Counter(
            "pdserve_client_stalls_total",
            "Requests cancelled because their client read nothing for --client-stall-seconds.",
            registry=r,
        )
        self.inflight = Gauge("pdserve_requests_in_flight", "Requests being served.", api, registry=r)
        self._apis = {name: ApiSlo(self, name) for name in apis}

    def of(self, api: str) -> ApiSlo:
        return self._apis[api]

    def targets(self, ttft_override: float | None, tpot_override: float | None) -> tuple[float, float]:
        return (
            ttft_override if ttft_override is not None else self.ttft_slo,
            tpot_override if tpot_override is not None else self.tpot_slo,
        )

    def finish(
        self,
        timer: RequestTimer,
        finish_reason: str,
        prompt_tokens: int,
        ttft_slo: float,
        tpot_slo: float,
        api: str = "grpc",
    ) -> tuple[bool, bool]:
        return self.of(api).finish(timer, finish_reason, prompt_tokens, ttft_slo, tpot_slo)

    def window_attainment(self) -> float:
        horizon = time.monotonic() - self.window_seconds
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()
        if not self._window:
            return 1.0
        return sum(1 for _, a, b in self._window if a and b) / len(self._window)


class ApiSlo:
    """One API's request metrics (the children labelled api=<name>), resolved once."""

    def __init__(self, tracker: SloTracker, api: str):
        t = self.tracker = tracker
        self.ttft, self.tpot, self.itl, self.e2e = (h.labels(api) for h in (t.ttft, t.tpot, t.itl, t.e2e))
        self.relay = t.relay.labels(api)
        self.requests = {reason: t.requests.labels(reason, api) for reason in FinishReason}
        self.prompt_tokens, self.generation_tokens = t.prompt_tokens.labels(api), t.generation_tokens.labels(api)
        self.slo_requests, self.slo_ttft_met = t.slo_requests.labels(api), t.slo_ttft_met.labels(api)
        self.slo_tpot_met, self.slo_met = t.slo_tpot_met.labels(api), t.slo_met.labels(api)
        self.inflight = t.inflight.labels(api)

    def finish(
        self, timer: RequestTimer, finish_reason: str, prompt_tokens: int, ttft_slo: float, tpot_slo: float
    ) -> tuple[bool, bool]:
        t = self.tracker
        known = finish_reason in FinishReason._value2member_map_
        self.requests[FinishReason(finish_reason) if known else FinishReason.ERROR].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(timer.num_tokens)
        t.prompt_len.observe(prompt_tokens)
        t.output_len.observe(timer.num_tokens)
        if timer.num_tokens:
            self.ttft.observe(timer.ttft)
            self.e2e.observe(timer.e2e)
            if timer.num_tokens > 1:
                self.tpot.observe(timer.tpot)
        ttft_met = timer.num_tokens > 0 and timer.ttft <= ttft_slo
        tpot_met = timer.num_tokens > 0 and timer.tpot <= tpot_slo
        if finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.slo_requests.inc()
            self.slo_ttft_met.inc(ttft_met)
            self.slo_tpot_met.inc(tpot_met)
            self.slo_met.inc(ttft_met and tpot_met)
            t._window.append((time.monotonic(), ttft_met, tpot_met))
        return ttft_met, tpot_met
