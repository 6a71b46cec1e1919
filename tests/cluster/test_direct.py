"""The direct gRPC paths. Direct: Serve's gRPC proxy calls the engine replicas itself (``application:
<app>-engine``, ``multiplexed_model_id: <adapter>``), one hop fewer than through the ingress.
Lookaside: a RoutingService.Lease routed the same way (or relayed by the ingress) names a replica's
own gRPC server, and the generation goes there (no Ray hop per token).

One cluster for the module, with a token (the replicas check it themselves on this path): answers
equal the single server's (the python client's ``engine_app`` option), the token refused on both
paths, calls without ``application`` still reaching the ingress, adapter affinity counted from the
replicas' own metrics, bad input, a replica killed under direct load, and SIGTERM with a direct
stream in flight; the same for lookaside (its answers, the token on the lease and on the replica's
own port, bad input, the lease ending with its generation, a killed replica, SIGTERM).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.cluster.config import engine_app_name
from tests.cluster.conftest import AFFINITY_ADAPTERS, run_cluster
from tests.cluster.test_cluster import (
    Outcomes,
    _engine_replica_actors,
    _get,
    _greedy,
    _kill_a_replica_under,
    _loads_by_replica,
    _sigterm_with_a_stream_in_flight,
    _wait_for_replicas,
)
from tests.serving import make_request

TOKEN = "cluster-token-1234"


@pytest.fixture(scope="module")
def cluster(tiny_llama, cluster_adapter_root, tmp_path_factory):
    yield from run_cluster(tiny_llama, cluster_adapter_root, tmp_path_factory, "--auth-token", TOKEN)


def _direct(cluster, adapter_id: str = "", token: str | None = TOKEN) -> tuple:
    """Metadata of a direct call: the engine application, the adapter to route by, the token."""
    md = [("application", engine_app_name(cluster.cfg))]
    if adapter_id:
        md.append(("multiplexed_model_id", adapter_id))
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    return tuple(md)


def _client(cluster, **kw):
    from clients.client import AdapterServeClient

    return AdapterServeClient(cluster.target, token=TOKEN, engine_app=engine_app_name(cluster.cfg), **kw)


def _assert_answers_equal(reference, client, adapter) -> None:
    """`client` (a cluster path) answers greedy generate and stream as `reference` (the single server)."""
    kw = dict(adapter=adapter or None, max_new_tokens=6, temperature=0)
    want = reference.generate("the cluster serves adapters", **kw)
    got = client.generate("the cluster serves adapters", **kw)
    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    chunks = list(client.stream("the cluster serves adapters", **kw))
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert chunks[-1].finish_reason == want.finish_reason


@pytest.mark.parametrize("adapter", ["", "lora", "prefix", "ia3", {"lora": 0.5, "hot0": 1.0}])
def test_direct_answers_equal_the_single_server(cluster, single, adapter):
    from clients.client import AdapterServeClient

    with AdapterServeClient(single.app.target) as reference, _client(cluster, timeout=120) as client:
        _assert_answers_equal(reference, client, adapter)
        # Calls other than generation name no application: the proxy hands them to the ingress.
        assert client.health() == "SERVING"
        assert client.model_info().name == single.app.model.name


def test_the_token_is_checked_on_both_paths(cluster, single):
    direct = cluster.gen.Generate
    for metadata, path in [(_direct(cluster, "lora", token=None), "direct"), ((), "ingress")]:
        with pytest.raises(grpc.RpcError) as err:
            direct(_greedy("lora"), metadata=metadata, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
        assert "missing credentials" in err.value.details(), path
        with pytest.raises(grpc.RpcError) as err:
            list(cluster.gen.GenerateStream(_greedy("lora"), metadata=(*metadata, ("authorization", "Bearer nope")),
                                            timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
        assert err.value.details() == "invalid token", path
    answer = direct(_greedy("lora"), metadata=_direct(cluster, "lora"), timeout=120)
    assert list(answer.token_ids) == list(single.gen.Generate(_greedy("lora"), timeout=60).token_ids)


def test_direct_bad_input_gets_the_single_servers_statuses(cluster):
    for request, code in [(_greedy("no-such-adapter"), grpc.StatusCode.NOT_FOUND),
                          (make_request("x", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as err:
            cluster.gen.Generate(request, metadata=_direct(cluster, request.adapter_id), timeout=120)
        assert err.value.code() == code
    raw = cluster.channel.unary_unary("/adapterserve.v1.GenerationService/Generate")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff", metadata=_direct(cluster), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed adapterserve.v1.GenerateRequest" in err.value.details()


def test_direct_hostile_routing_ids_get_the_single_servers_statuses(cluster, single):
    """The routing metadata is the client's to write: a traversal id, an id the request does not carry, a
    long one, NaN sampling. Each call answers as the single server answers the same request (the replica
    loads by the request's own id, never by the metadata's), and the cluster serves normally after."""
    def outcome(stub, request, metadata=None) -> tuple:
        try:
            return ("OK", tuple(stub.Generate(request, metadata=metadata, timeout=120).token_ids))
        except grpc.RpcError as e:
            return (e.code().name, ())

    cases = [(_greedy("../../etc/passwd"), "../../etc/passwd"),
             (_greedy("no-such-adapter"), "lora"),  # routed to where "lora" lives; the request names another
             (_greedy("lora"), "r" * 1000),  # an id no replica holds: the request's own adapter still loads
             (make_request("x", temperature=float("nan")), "lora")]
    for request, routed in cases:
        want = outcome(single.gen, request)
        got = outcome(cluster.gen, request, _direct(cluster, routed))
        assert got == want, (request.adapter_id, routed)
    after = cluster.gen.Generate(_greedy("lora"), metadata=_direct(cluster, "lora"), timeout=120)
    assert list(after.token_ids) == list(single.gen.Generate(_greedy("lora"), timeout=60).token_ids)


# ---------------------------------------------------------------------------------- lookaside
def _lookaside(cluster, via_engine_app: bool = True, **kw):
    from clients.client import AdapterServeClient

    app = engine_app_name(cluster.cfg) if via_engine_app else None
    return AdapterServeClient(cluster.target, token=TOKEN, engine_app=app, lookaside=True, **kw)


@pytest.mark.parametrize("adapter,via_engine_app", [("", True), ("lora", True), ("prefix", True), ("ia3", True),
                                                    ({"lora": 0.5, "hot0": 1.0}, True), ("lora", False)])
def test_lookaside_answers_equal_the_single_server(cluster, single, adapter, via_engine_app):
    """Lease (through the engine application, or relayed by the ingress), then the replica's own server:
    the single server's tokens, unary and streamed."""
    from clients.client import AdapterServeClient

    with AdapterServeClient(single.app.target) as reference, \
            _lookaside(cluster, via_engine_app, timeout=120) as client:
        _assert_answers_equal(reference, client, adapter)


def _lease(cluster, adapter: str, token: str | None = TOKEN) -> tuple:
    """(the open lease call, its answer) through the engine application."""
    call = pb_grpc.RoutingServiceStub(cluster.channel).Lease(
        pb.LeaseRequest(adapter_id=adapter), metadata=_direct(cluster, adapter, token), timeout=120)
    return call, next(call)


def test_lookaside_token_lease_and_the_lease_ending_with_its_generation(cluster, single):
    """The lease checks the token, and so does the replica's own server; a leased generation answers
    as the single server's, and its lease then ends OK; bad input gets the single server's statuses."""
    with pytest.raises(grpc.RpcError) as err:
        _lease(cluster, "lora", token=None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    lease, answer = _lease(cluster, "lora")
    assert answer.address.startswith("127.0.0.1:") and len(answer.lease_id) == 32 and answer.replica
    with grpc.insecure_channel(answer.address) as channel:
        replica = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            replica.Generate(_greedy("lora"), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {TOKEN}"), ("adapterserve-lease", answer.lease_id))
        got = replica.Generate(_greedy("lora"), metadata=md, timeout=120)
        assert list(got.token_ids) == list(single.gen.Generate(_greedy("lora"), timeout=60).token_ids)
        assert list(lease) == [] and lease.code() == grpc.StatusCode.OK  # ended by the replica, not the client
        for metadata in (md, md[:1]):  # the lease again (one lease, one generation); no lease at all
            with pytest.raises(grpc.RpcError) as err:
                replica.Generate(_greedy("lora"), metadata=metadata, timeout=60)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, metadata
        with pytest.raises(grpc.RpcError) as err:  # adapter admin goes through the cluster, never one replica
            pb_grpc.AdapterServiceStub(channel).UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="lora"),
                                                                  metadata=md[:1], timeout=60)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    from clients.errors import InvalidArgumentError, NotFoundError

    with _lookaside(cluster, timeout=120) as client:
        with pytest.raises(NotFoundError):
            client.generate("x", adapter="no-such-adapter", max_new_tokens=2)
        with pytest.raises(InvalidArgumentError, match="temperature"):
            list(client.stream("x", adapter="lora", max_new_tokens=2, temperature=-1.0))
        for hostile in ("../../etc/passwd", "r" * 1000, "a\x00b"):  # leased, then refused as the single server does
            with pytest.raises(grpc.RpcError) as want:
                single.gen.Generate(_greedy(hostile), timeout=60)
            with pytest.raises(InvalidArgumentError, match="adapter_id") as got:
                client.generate("x", adapter=hostile, max_new_tokens=2)
            assert got.value.code == want.value.code(), hostile[:20]
        assert client.generate("x", adapter="lora", max_new_tokens=2).token_ids  # and serves after
    raw = cluster.channel.unary_stream("/adapterserve.v1.RoutingService/Lease")
    for metadata in (_direct(cluster), (("authorization", f"Bearer {TOKEN}"),)):  # engine application, ingress
        with pytest.raises(grpc.RpcError) as err:
            list(raw(b"\xff\xff\xff", metadata=metadata, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed adapterserve.v1.LeaseRequest" in err.value.details()


def test_serve_counts_a_lookaside_generation_while_it_runs(cluster):
    """The lease is what Serve sees of a lookaside generation: while a stream runs on a replica's own
    port, that replica reports an ongoing request to Serve's routers (and autoscaler); none after."""
    def ongoing() -> int:
        return sum(ray.get([a.get_num_ongoing_requests.remote() for a in _engine_replica_actors()], timeout=60))

    def settled(want, timeout: float = 30.0) -> int:
        end = time.monotonic() + timeout
        while (n := ongoing()) != want and time.monotonic() < end:
            time.sleep(0.2)
        return n

    assert settled(0) == 0
    seen: list[int] = []
    with _lookaside(cluster, timeout=120) as client:
        for i, _ in enumerate(client.stream("a long answer please", adapter="lora", max_new_tokens=120,
                                            ignore_eos=True)):
            if i in (5, 60):
                seen.append(ongoing())
    assert seen == [1, 1]
    assert settled(0) == 0  # the lease ended with the generation


def test_direct_affinity_after_warm_up(cluster):
    """As test_cluster's affinity test, every request through the direct path: the proxy's router
    sends an adapter's requests to the replica holding it (loads counted by the replicas' metrics)."""
    def one(name: str) -> None:
        cluster.gen.Generate(make_request("hi", name, max_new_tokens=1), metadata=_direct(cluster, name), timeout=120)

    for warm in range(8):
        start = sum(_loads_by_replica(cluster).values())
        for name in AFFINITY_ADAPTERS:
            one(name)
        time.sleep(1.0)
        if warm >= 2 and sum(_loads_by_replica(cluster).values()) == start:
            break
    before = _loads_by_replica(cluster)
    assert len(before) == 2, before
    order = [AFFINITY_ADAPTERS[(i * 7) % 4] for i in range(40)]
    for name in order:
        one(name)
    after = _loads_by_replica(cluster)
    loads = sum(after.values()) - sum(before.values())
    assert 1 - loads / len(order) >= 0.9, (before, after)


def test_replica_killed_under_direct_load(cluster):
    """Kill one engine replica while the proxy streams from it directly: every stream ends OK or
    UNAVAILABLE (the proxy's INTERNAL for a lost actor is mapped), the client's Generate OK or
    UNAVAILABLE (after its one retry), nothing hangs; Serve brings the replica back."""
    outcomes = Outcomes()
    started = threading.Event()

    @outcomes.recorded
    def stream(i: int) -> None:
        name = AFFINITY_ADAPTERS[i % 4]
        req = make_request("a long answer please", name, max_new_tokens=200, min_new_tokens=200)
        for _ in cluster.gen.GenerateStream(req, metadata=_direct(cluster, name), timeout=90):
            started.set()

    @outcomes.recorded
    def unary(i: int) -> None:
        with _client(cluster, timeout=90) as client:
            client.generate("hi", adapter=AFFINITY_ADAPTERS[i % 4], max_new_tokens=40)

    @outcomes.recorded
    def leased(i: int) -> None:  # lookaside: a stream and a unary call straight to the replica
        with _lookaside(cluster, timeout=90) as client:
            name = AFFINITY_ADAPTERS[i % 4]
            for _ in client.stream("a long answer please", adapter=name, max_new_tokens=200, ignore_eos=True):
                started.set()
            client.generate("hi", adapter=name, max_new_tokens=40)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=unary, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=leased, args=(i,)) for i in range(4)]
    _kill_a_replica_under(threads, started)
    assert len(outcomes.seen) == 12
    assert set(outcomes.seen) <= {"OK", "UNAVAILABLE"}, outcomes.seen
    _wait_for_replicas(cluster, 2)
    with _client(cluster, timeout=120) as client:
        for name in AFFINITY_ADAPTERS:
            assert client.generate("hi", adapter=name, max_new_tokens=2).token_ids
    assert _get(cluster.http + "/health") == (200, "SERVING")


def test_sigterm_lets_a_direct_stream_finish(cluster):
    """SIGTERM (the module's last test: it stops the cluster) with a direct stream and a lookaside stream
    in flight: the engine replica counted both, so both finish with every token; the process exits 0."""
    import psutil

    started = psutil.Process(cluster.proc.pid).children(recursive=True)
    leased: list = []
    first = threading.Event()

    def lookaside_stream() -> None:
        tokens = 0
        try:
            with _lookaside(cluster, timeout=120) as client:
                for chunk in client.stream("a long answer please", adapter="hot0", max_new_tokens=200,
                                           ignore_eos=True):
                    tokens += len(chunk.token_ids)
                    first.set()
            leased.append(("OK", tokens))
        except Exception as e:  # (recorded: the assertion below names it)
            leased.append((repr(e), tokens))
        first.set()

    reader = threading.Thread(target=lookaside_stream)
    reader.start()
    assert first.wait(60)
    _sigterm_with_a_stream_in_flight(cluster, started, _direct(cluster, "lora"))
    reader.join(30)
    assert leased == [("OK", 200)]
