"""Security with real processes (issue 17): `pdserve up --tls --api-key` runs every port with
mutual TLS under a throwaway CA. Greedy output over TLS equals transformers'; the router's API
refuses calls without the key; every internal service (workers, kvstore daemons) refuses clients
without a certificate of the cluster's CA; reflection is off on internal services; a renewed
certificate is served without a restart. The prefill instance spans 2 pods (engine/follower.py): its
follower joins the worker over mutual TLS too."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import os
import socket
import ssl
import time
import urllib.request

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_server import running_prometheus

from pdserve.v1 import common_pb2, common_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, router_pb2, router_pb2_grpc
from services.cli.generate import router_channel
from services.common.certs import ClusterCa, new_cluster_ca
from services.common.grpc_client import sync_channel
from services.common.tls import TlsFiles
from services.launcher import prometheus_config
from services.tiny_models import get_model
from tests.proc_sockets import listening_sockets

pytestmark = pytest.mark.slow

API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(cluster_factory):
    return cluster_factory(
        "--model", get_model("llama"), "--tls", "--api-key", API_KEY, "--prefill", "1", "--decode", "1", "--nodes", "2",
        *("--prefill-pp", "2", "--prefill-pods", "2"),
    )  # fmt: skip


def _client_tls(cluster) -> TlsFiles:
    return TlsFiles(**cluster.info["tls"])


async def _generate(cluster, item: dict, api_key: str | None = API_KEY) -> list[int]:
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    tls = _client_tls(cluster)
    async with router_channel(cluster.router, tls.ca, tls.server_name) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(
            prompt=item["prompt"], sampling=common_pb2.SamplingParams(max_tokens=item["max_tokens"], temperature=0)
        )
        return [t async for r in stub.Generate(request, timeout=60, metadata=metadata) for t in r.token_ids]


def test_greedy_output_over_tls_equals_transformers(cluster, workload):
    async def run():
        return await asyncio.gather(*(_generate(cluster, item) for item in workload))

    results = asyncio.run(run())
    assert results == [item["expected"] for item in workload]
    cluster.wait_idle(tls=_client_tls(cluster))


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef", ""], ids=["none", "wrong", "empty"])
def test_the_router_refuses_a_call_without_its_api_key(cluster, workload, key):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate(cluster, workload[0], api_key=key))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # health stays open for probes and load balancers
    with sync_channel(cluster.router, _client_tls(cluster)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _https(cluster, method: str, path: str, body: dict | None = None, api_key: str | None = API_KEY):
    """A request to the router's OpenAI-compatible API over HTTPS, its certificate checked against
    the cluster's CA: (status, JSON answer)."""
    host, port = cluster.info["http"].rsplit(":", 1)
    context = ssl.create_default_context(cafile=_client_tls(cluster).ca)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        conn.close()


def test_the_http_api_serves_https_and_needs_the_api_key(cluster, workload):
    item = workload[0]
    body = {"prompt": item["ids"], "max_tokens": item["max_tokens"], "temperature": 0, "logprobs": 0}
    status, answer = _https(cluster, "POST", "/v1/completions", {**body, "return_tokens_as_token_ids": True})
    assert status == 200
    assert [int(t.split(":")[1]) for t in answer["choices"][0]["logprobs"]["tokens"]] == item["expected"]
    for key in (None, "wrong-key-0123456789abcdef"):
        status, answer = _https(cluster, "POST", "/v1/completions", body, api_key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert _https(cluster, "GET", "/health", api_key=None)[0] == 200  # probes need no key
    host, port = cluster.info["http"].rsplit(":", 1)
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException)):  # no plaintext on the TLS port
        plain.request("GET", "/health")
        plain.getresponse()
    plain.close()


def _internal_call(address: str, role: str, tls: TlsFiles | None, ca_only: str = "") -> None:
    if ca_only:  # TLS, trusting the cluster's CA, but presenting no certificate
        with open(ca_only, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "pdserve")])
    else:
        channel = sync_channel(address, tls)
    with channel:
        if role == "kvstore":
            kvstore_pb2_grpc.KvStoreStub(channel).Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=5)
        else:
            common_pb2_grpc.WorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)


def test_internal_services_accept_only_clients_with_a_cluster_certificate(cluster, tmp_path):
    stranger = new_cluster_ca(str(tmp_path / "other-ca")).issue("stranger", "127.0.0.1")
    stranger_with_our_ca = TlsFiles(stranger.cert, stranger.key, _client_tls(cluster).ca)
    internal = [s for s in cluster.info["services"] if s["role"] not in ("router", "follower")]
    assert {s["role"] for s in internal} == {"prefill", "decode", "kvstore"}
    for svc in internal:
        _internal_call(svc["grpc"], svc["role"], _client_tls(cluster))  # a cluster member: served
        for how in ("plaintext", "no certificate", "another CA's certificate"):
            with pytest.raises(grpc.RpcError) as err:
                if how == "plaintext":
                    _internal_call(svc["grpc"], svc["role"], None)
                elif how == "no certificate":
                    _internal_call(svc["grpc"], svc["role"], None, ca_only=_client_tls(cluster).ca)
                else:
                    _internal_call(svc["grpc"], svc["role"], stranger_with_our_ca)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (svc["name"], how)  # the handshake fails


def test_reflection_is_off_on_internal_services_and_on_at_the_router(cluster):
    for svc in cluster.info["services"]:
        if svc["role"] == "follower":  # serves nothing
            continue
        with sync_channel(svc["grpc"], _client_tls(cluster)) as channel:
            try:
                names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
                names = set()
        assert ("pdserve.v1.Router" in names) == (svc["role"] == "router"), svc["name"]


def test_every_port_binds_the_host_given(cluster):
    """`pdserve up` binds to --host (127.0.0.1): no service listens on another interface's address
    or on the unspecified one, UCX's transports included (a kvstore's UCX listens on the interface
    of its --transfer-host, and takes connections without a sockaddr listener)."""
    for svc in cluster.info["services"]:
        for address, port in listening_sockets(svc["pid"]):
            ip = ipaddress.ip_address(address)
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            assert (mapped or ip).is_loopback, (svc["name"], address, port)


def test_metrics_are_served_to_cluster_members_only(cluster, tmp_path):
    """Every service's /metrics is HTTPS for clients with a cluster certificate (`--metrics-tls
    mutual`, the default under TLS): refused in plaintext, without a certificate, or with another
    CA's; and a real Prometheus with `pdserve up --prometheus-config`'s configuration scrapes them."""
    tls = _client_tls(cluster)
    stranger = new_cluster_ca(str(tmp_path / "other-ca")).issue("stranger", "127.0.0.1")
    services = [s for s in cluster.info["services"] if s["metrics"]]
    assert {s["role"] for s in services} == {"router", "prefill", "decode", "kvstore"}
    for svc in services:
        assert "process_resident_memory_bytes" in cluster.metrics_text(svc, tls)
        for how in ("plaintext", "no certificate", "another CA's certificate"):
            with pytest.raises(OSError):  # a failed handshake, or the connection closed on it
                if how == "plaintext":
                    cluster.metrics_text(svc)
                elif how == "no certificate":
                    context = ssl.create_default_context(cafile=tls.ca)
                    context.check_hostname = False
                    urllib.request.urlopen(f"https://{svc['metrics']}/metrics", timeout=5, context=context).read()
                else:
                    cluster.metrics_text(svc, TlsFiles(stranger.cert, stranger.key, tls.ca))
    with running_prometheus(prometheus_config(cluster.info, scrape_interval="1s"), tmp_path) as url:
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as r:
                targets = json.load(r)["data"]["activeTargets"]
            if len(targets) == len(services) and all(t["health"] == "up" for t in targets):
                break
            assert time.monotonic() < deadline, [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
            time.sleep(0.5)


def _served_certificate(address: str, ca: str, alpn: str = "h2", client: TlsFiles | None = None) -> x509.Certificate:
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    context.set_alpn_protocols([alpn])
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="pdserve") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_renewed_certificate_is_served_without_a_restart(cluster):
    tls = _client_tls(cluster)
    router = next(s for s in cluster.info["services"] if s["role"] == "router")
    before = _served_certificate(cluster.router, tls.ca)
    before_http = _served_certificate(cluster.info["http"], tls.ca, alpn="http/1.1")
    before_metrics = _served_certificate(router["metrics"], tls.ca, alpn="http/1.1", client=tls)
    assert before_http.serial_number == before.serial_number == before_metrics.serial_number  # one for every port
    ca = ClusterCa(os.path.dirname(tls.ca), tls.ca)
    renewed = ca.issue("router", "127.0.0.1")  # rewrites the router's files in place, as a renewal does
    assert renewed.cert.endswith("router.crt")
    deadline = time.monotonic() + 10
    for address, alpn in ((cluster.router, "h2"), (cluster.info["http"], "http/1.1"), (router["metrics"], "http/1.1")):
        while _served_certificate(address, tls.ca, alpn, client=tls).serial_number == before.serial_number:
            assert time.monotonic() < deadline, f"the renewed certificate was not served on {address}"
            time.sleep(0.2)
    assert asyncio.run(_generate(cluster, {"prompt": "still serving", "max_tokens": 3}))
    assert _https(cluster, "GET", "/v1/models")[0] == 200
    assert router["pid"] == next(s for s in cluster.info["services"] if s["role"] == "router")["pid"]
