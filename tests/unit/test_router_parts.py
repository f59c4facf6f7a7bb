"""Router pieces: incremental detokenization, env-var flags, SLO accounting."""

import random

import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from services.common.flags import FlagParser
from services.router.detokenizer import IncrementalDetokenizer
from services.router.slo import RequestTimer, SloTracker
from services.tiny_models import get_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_model("llama"))


@pytest.mark.parametrize("text", ["plain words and numbers 123", "héllo wörld, naïve café", "日本語のテキスト 🙂🚀 ok"])
def test_incremental_text_equals_full_decode_and_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    rng = random.Random(0)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt"))
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(detok.add(ids[i : i + n]))
        i += n
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_fast_path_equals_the_tokenizers_decode_of_any_ids(tokenizer, skip_special_tokens):
    """Random ids (special tokens, bytes that are no valid UTF-8, characters split anywhere): the
    byte table gives what the windowed decode and the tokenizer's own decode give."""
    rng = random.Random(1)
    for trial in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        fast = IncrementalDetokenizer(tokenizer, [5, 6], skip_special_tokens)
        slow = IncrementalDetokenizer(tokenizer, [5, 6], skip_special_tokens)
        slow._bytes = None  # the windowed decode, as for a tokenizer that is not byte-level
        assert fast._bytes is not None
        texts = {"fast": [], "slow": []}
        i = 0
        while i < len(ids):
            n = rng.randint(1, 3)
            texts["fast"].append(fast.add(ids[i : i + n]))
            texts["slow"].append(slow.add(ids[i : i + n]))
            i += n
        texts["fast"].append(fast.flush())
        texts["slow"].append(slow.flush())
        whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        assert "".join(texts["fast"]) == "".join(texts["slow"]) == whole, (trial, ids)


def test_flags_fall_back_to_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_KV_CACHE_GB", "1.5")
    monkeypatch.setenv("PDSERVE_DECODE", "a:1,b:2")
    monkeypatch.setenv("PDSERVE_VERBOSE", "true")
    p = FlagParser()
    p.add_flag("--kv-cache-gb", default=0.25, type=float)
    p.add_flag("--decode", action="append")
    p.add_flag("--verbose", action="store_true")
    p.add_flag("--port", default=7, type=int)
    args = p.parse_args([])
    assert (args.kv_cache_gb, args.decode, args.verbose, args.port) == (1.5, ["a:1", "b:2"], True, 7)
    assert p.parse_args(["--kv-cache-gb", "3"]).kv_cache_gb == 3.0  # the command line wins
    # a repeatable flag on the command line replaces the environment's list, not extends it
    assert p.parse_args(["--decode", "c:3", "--decode", "d:4"]).decode == ["c:3", "d:4"]
    assert p.parse_args([]).decode == ["a:1", "b:2"]  # the default list is not mutated
    monkeypatch.delenv("PDSERVE_DECODE")
    q = FlagParser()
    q.add_flag("--decode", action="append")
    assert q.parse_args([]).decode is None and q.parse_args(["--decode", "x:1"]).decode == ["x:1"]


def test_slo_accounting_per_request_targets():
    registry = CollectorRegistry()
    slo = SloTracker(registry, ttft_slo=0.25, tpot_slo=0.1, window_seconds=60)
    fast, slow_tpot = RequestTimer(arrived=0.0), RequestTimer(arrived=0.0)
    for t in [0.1, 0.15, 0.2]:
        fast.tokens(1, now=t)
    for t in [0.2, 0.5, 0.8]:
        slow_tpot.tokens(1, now=t)
    assert fast.ttft == pytest.approx(0.1) and fast.tpot == pytest.approx(0.05)
    assert slo.finish(fast, "length", 10, 0.25, 0.1) == (True, True)
    assert slo.finish(slow_tpot, "stop", 10, 0.25, 0.1) == (True, False)
    assert slo.finish(slow_tpot, "stop", 10, 0.25, 0.5) == (True, True)  # a looser per-request SLO
    assert slo.window_attainment() == pytest.approx(2 / 3)
    slo.finish(RequestTimer(arrived=0.0), "cancelled", 10, 0.25, 0.1)  # not judged
    assert slo.finish(fast, "stop", 10, 0.25, 0.1, api="http") == (True, True)
    grpc, http = {"api": "grpc"}, {"api": "http"}
    assert registry.get_sample_value("pdserve_slo_requests_total", grpc) == 3
    assert registry.get_sample_value("pdserve_slo_met_total", grpc) == 2
    assert registry.get_sample_value("pdserve_slo_met_total", http) == 1
    assert registry.get_sample_value("pdserve_requests_total", {"finish_reason": "cancelled", **grpc}) == 1
    assert registry.get_sample_value("pdserve_requests_total", {"finish_reason": "stop", **http}) == 1
    assert slo.window_attainment() == pytest.approx(3 / 4)  # one window over both APIs


def test_an_unexpected_router_error_is_internal_and_counted(tokenizer):
    """A bug inside the router (here: a worker registry that raises) reaches the client as
    INTERNAL with the error, not UNKNOWN, and counts as an errored request; the server goes on."""
    import asyncio

    import grpc

    from pdserve.v1 import router_pb2, router_pb2_grpc
    from services.common.server import ServiceInterceptor
    from services.launcher import free_port
    from services.router.server import RouterService

    class BrokenRegistry:
        roles = frozenset({"prefill", "decode"})

        def eligible(self, role):
            raise RuntimeError("registry bug")

    registry = CollectorRegistry()
    slo = SloTracker(registry, ttft_slo=1.0, tpot_slo=1.0, window_seconds=60)

    async def run():
        service = RouterService(BrokenRegistry(), tokenizer, model_id="m", max_model_len=256, vocab_size=1024, slo=slo)
        server = grpc.aio.server(interceptors=[ServiceInterceptor(CollectorRegistry())])  # as every pdserve server
        router_pb2_grpc.add_RouterServicer_to_server(service, server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                for _ in range(2):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in stub.Generate(router_pb2.GenerateRequest(prompt="hi"), timeout=10):
                            pass
                    assert err.value.code() == grpc.StatusCode.INTERNAL
                    assert "registry bug" in err.value.details()
        finally:
            await server.stop(None)
            await service.kvstore.close()

    asyncio.run(run())
    assert registry.get_sample_value("pdserve_requests_total", {"finish_reason": "error", "api": "grpc"}) == 2


def test_a_worker_calls_updates_reach_each_request_in_order():
    """The worker's side of a call (streaming.ServedCall) builds StreamUpdates, plain tokens in the
    columns and the rest in chunks; the router's side (worker_calls.WorkerCall) sorts them to the
    requests. Whatever the mix, each request gets its tokens in order, its logprobs, its timings
    and its end, and one that failed raises its status after the tokens before."""
    import asyncio
    from types import SimpleNamespace

    import grpc

    from pdserve.v1 import worker_pb2
    from services.common.errors import ServiceError
    from services.common.server import COLUMNS_METADATA
    from services.router.worker_calls import WorkerCall
    from services.runtime.streaming import Produced, ServedCall

    served = ServedCall()
    # (add() reads a job's admission ticket only)
    served.jobs = {i: SimpleNamespace(ticket=None) for i in (1, 2, 3, 4)}  # type: ignore[misc]
    updates = []
    # 1: plain tokens over two updates, then its end; 2: a first token with timings (a chunk), then
    # plain tokens that must join that chunk; 3: logprobs throughout; 4: tokens, then a failure
    served.add(1, Produced([10, 11]))
    served.add(2, Produced([20], queue_seconds=0.5, prefill_seconds=0.25))
    served.add(3, Produced([30], [-0.5]))
    served.add(4, Produced([40]))
    served.add(2, Produced([21]))
    served.add(1, Produced([12]))
    updates.append(served.take())
    served.add(1, Produced([13]))
    served.add(4, Produced([41]))
    served.add(3, Produced([31], [-0.25], finish_reason="stop"))
    served.add(1, Produced([14], finish_reason="length"))
    served.add(4, ServiceError(grpc.StatusCode.INTERNAL, "device lost"))
    served.add(2, Produced([22], finish_reason="stop"))
    updates.append(served.take())
    assert not served.has_news()
    assert list(updates[0].stream_ids) == [1, 4, 1] and list(updates[0].token_ids) == [10, 11, 40, 12]
    assert {c.stream_id for c in updates[0].chunks} == {2, 3}

    async def scenario():
        sent_metadata = []

        def method(requests, metadata):
            sent_metadata.extend(metadata)
            return _WorkerCallUpdates(updates)

        call = WorkerCall("w", method, worker_pb2.GenerateStreamRequest)
        streams = {i: call.open(worker_pb2.GenerateTokensRequest(), timeout=None) for i in (1, 2, 3, 4)}
        got: dict[int, list] = {}

        async def read(i):
            got[i] = []
            try:
                async for tokens in streams[i]:
                    got[i].append(tokens)
            except grpc.aio.AioRpcError as exc:
                got[i].append(exc.code())

        await asyncio.gather(*(read(i) for i in streams))
        assert COLUMNS_METADATA in sent_metadata  # the router tells the worker it reads the columns
        return got

    got = asyncio.run(scenario())
    merged = {i: [t for c in got[i] if not isinstance(c, grpc.StatusCode) for t in c.token_ids] for i in got}
    assert merged == {1: [10, 11, 12, 13, 14], 2: [20, 21, 22], 3: [30, 31], 4: [40, 41]}
    assert got[1][-1].finish_reason == "length" and got[2][-1].finish_reason == "stop"
    assert [lp for chunk in got[3] for lp in chunk.logprobs] == [-0.5, -0.25]
    assert got[2][0].queue_seconds == 0.5 and got[2][0].prefill_seconds == 0.25
    assert got[4][-1] == grpc.StatusCode.INTERNAL


def test_tokens_that_waited_for_their_reader_keep_the_arrival_of_the_oldest():
    """How long tokens wait at the router (pdserve_router_token_relay_seconds) counts from when
    the worker's message reached it; tokens merged while their reader was away keep the oldest
    one's arrival, so the wait is the oldest token's."""
    import asyncio
    import time

    import grpc

    from pdserve.v1 import worker_pb2
    from services.router.worker_calls import WorkerCall

    updates = [worker_pb2.StreamUpdate(stream_ids=[1], token_counts=[1], token_ids=[t]) for t in (7, 8)]
    sent_at: list[float] = []

    class Paced(_WorkerCallUpdates):
        async def __anext__(self):
            await asyncio.sleep(0.01)
            update = await super().__anext__()
            sent_at.append(time.monotonic())
            return update

    async def scenario():
        call = WorkerCall("w", lambda requests, metadata: Paced(updates), worker_pb2.GenerateStreamRequest)
        stream = call.open(worker_pb2.GenerateTokensRequest(), timeout=None)
        await asyncio.sleep(0.1)  # both updates come, then the call ends, while nobody reads
        tokens = await stream.__anext__()
        with pytest.raises(grpc.aio.AioRpcError):
            await stream.__anext__()
        return tokens

    tokens = asyncio.run(scenario())
    assert tokens.token_ids == [7, 8]
    assert len(sent_at) == 2 and sent_at[0] <= tokens.arrived < sent_at[1]


def test_tokens_wait_at_the_router_for_a_slow_client_and_the_first_message_is_not_counted(tokenizer):
    """pdserve_router_token_relay_seconds, through RouterService.generate over a worker call:
    every message after a request's first counts once (the first is TTFT's, here a colocated
    worker's), from its oldest token's arrival, so tokens that came while the client was still
    taking the message before (a 100 ms write here, a token every 10 ms) count that wait."""
    import asyncio
    from types import SimpleNamespace

    from pdserve.v1 import common_pb2, worker_pb2
    from services.router.server import Generation, RouterService
    from services.router.worker_calls import WorkerCall

    tokens = 12

    class PacedWorker(_WorkerCallUpdates):  # one token every 10 ms, the last with its end
        def __init__(self):
            updates = [
                worker_pb2.StreamUpdate(stream_ids=[1], token_counts=[1], token_ids=[100 + i]) for i in range(1, tokens)
            ]
            end = worker_pb2.StreamUpdate()
            end.chunks.add(stream_id=1).chunk.MergeFrom(common_pb2.TokenChunk(token_ids=[100], finish_reason="length"))
            super().__init__(updates + [end])

        async def __anext__(self):
            await asyncio.sleep(0.01)
            return await super().__anext__()

    registry = CollectorRegistry()
    slo = SloTracker(registry, ttft_slo=1.0, tpot_slo=1.0, window_seconds=60)
    service = RouterService(
        SimpleNamespace(roles=frozenset({"colocated"})),
        tokenizer,
        model_id="m",
        max_model_len=256,
        vocab_size=1024,
        slo=slo,
    )
    call = WorkerCall("w", lambda requests, metadata: PacedWorker(), worker_pb2.GenerateStreamRequest)
    worker = SimpleNamespace(inflight_requests=0, inflight_prompt_tokens=0, role="colocated", address="w")

    async def colocated(state, timer):  # the real relaying (_stream) over the paced call, no dispatch
        async for chunk in service._stream(worker, call.open(worker_pb2.GenerateTokensRequest(), None), state, 0):
            yield chunk

    service._colocated = colocated  # type: ignore[method-assign]
    messages = []

    async def slow_client(response):
        messages.append(response)
        await asyncio.sleep(0.1)

    async def run():
        try:
            await service.generate(
                Generation([1, 2, 3], common_pb2.SamplingParams(max_tokens=tokens), "r", 1.0, 1.0), slow_client
            )
        finally:
            await service.kvstore.close()

    asyncio.run(run())
    grpc_api = {"api": "grpc"}
    assert sum(len(m.token_ids) for m in messages) == tokens and 1 < len(messages) < tokens  # merged while writing
    relayed = registry.get_sample_value("pdserve_router_token_relay_seconds_count", grpc_api)
    assert (
        relayed == len(messages) - 1 == registry.get_sample_value("pdserve_inter_token_latency_seconds_count", grpc_api)
    )
    # each message's oldest token came ~10 ms into the 100 ms write before it
    assert registry.get_sample_value("pdserve_router_token_relay_seconds_bucket", {**grpc_api, "le": "0.05"}) == 0


class _WorkerCallUpdates:
    """A stub's call to a worker, as grpc.aio's: yields the given StreamUpdates, then ends."""

    def __init__(self, updates):
        self.updates = iter(updates)

    def __aiter__(self):
        return self

    async def __anext__(self):
        import asyncio

        await asyncio.sleep(0)
        try:
            return next(self.updates)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        pass


@pytest.mark.parametrize(
    "columns",
    [
        {"stream_ids": [1, 2], "token_counts": [1, 2], "token_ids": [5, 6]},  # 3 counted, 2 sent
        {"token_counts": [1], "token_ids": [5]},  # tokens for no stream
        {"stream_ids": [1, 2], "token_counts": [0, 1], "token_ids": [5]},  # an entry of no tokens
    ],
    ids=["counts-differ", "no-stream-ids", "empty-entry"],
)
def test_a_worker_update_whose_columns_differ_fails_the_calls_requests_with_internal(columns):
    import asyncio

    import grpc

    from pdserve.v1 import worker_pb2
    from services.router.worker_calls import WorkerCall

    bad = worker_pb2.StreamUpdate(**columns)

    async def scenario():
        call = WorkerCall("w", lambda requests, metadata: _WorkerCallUpdates([bad]), worker_pb2.GenerateStreamRequest)
        streams = [call.open(worker_pb2.GenerateTokensRequest(), timeout=None) for _ in range(2)]
        codes = []
        for stream in streams:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stream:
                    pass
            codes.append((err.value.code(), err.value.details()))
        return codes

    for code, details in asyncio.run(scenario()):
        assert code == grpc.StatusCode.INTERNAL and "columns" in details
