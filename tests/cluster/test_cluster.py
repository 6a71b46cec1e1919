"""`python -m server.cluster` on a local Ray: answers equal the single server's, adapter affinity,
the same statuses for bad input, health, per-replica metrics, and a replica killed under load.

One cluster for the whole module (Ray's start dominates the time): 2 engine replicas that hold 2
adapters each, a tiny random Llama, adapters of every PEFT kind in the adapter store.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import ray  # the `cluster` extra, part of `make test`'s install: these tests never skip

from adapterserve.v1 import adapterserve_pb2 as pb
from server.cluster.config import engine_app_name
from tests.cluster.conftest import AFFINITY_ADAPTERS, KINDS
from tests.serving import make_request

STOP_BOUND_S = 120  # --drain-seconds 0.5 + an in-flight stream's end + the delete + Ray's shutdown, on a slow host


def _post(url: str, doc: dict, timeout: float = 60) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(url: str, timeout: float = 60) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _greedy(adapter_id: str = "", **kw) -> pb.GenerateRequest:
    return make_request("the cluster serves adapters", adapter_id, max_new_tokens=6, temperature=0, **kw)


@pytest.mark.parametrize("adapter_id", ["", *KINDS])
def test_answers_equal_the_single_server(cluster, single, adapter_id):
    want = single.gen.Generate(_greedy(adapter_id), timeout=60)
    got = cluster.gen.Generate(_greedy(adapter_id), timeout=120)
    assert list(got.token_ids) == list(want.token_ids)
    assert got.text == want.text
    streamed = list(cluster.gen.GenerateStream(_greedy(adapter_id), timeout=120))
    assert [t for c in streamed for t in c.token_ids] == list(want.token_ids)
    assert streamed[-1].finish_reason == want.finish_reason


def test_http_answers_equal_the_single_server(cluster, single):
    doc = {"model": "lora", "prompt": "the cluster serves adapters", "max_tokens": 6, "temperature": 0}
    want = single.generate("the cluster serves adapters", "lora", max_new_tokens=6, temperature=0)
    status, body = _post(cluster.http + "/v1/completions", doc)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["text"] == want.text
    status, body = _post(cluster.http + "/v1/completions", {**doc, "stream": True})
    assert status == 200
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want.text


def _codes(stub_owner, requests) -> list[tuple[str, str]]:
    out = []
    for req in requests:
        try:
            stub_owner.gen.Generate(req, timeout=60)
            out.append(("OK", ""))
        except grpc.RpcError as e:
            out.append((e.code().name, e.details()))
    return out


def test_bad_input_gets_the_single_servers_statuses(cluster, single):
    bad = [_greedy("no-such-adapter"), _greedy("../etc"), make_request("x", temperature=-1.0),
           make_request("x", max_new_tokens=10**6), make_request(None)]
    want = _codes(single, bad)
    assert [c for c, _ in want] == ["NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                                    "INVALID_ARGUMENT"]
    assert _codes(cluster, bad) == want
    # Malformed protobuf bytes: INVALID_ARGUMENT naming the message, as the single server's interceptor says.
    for target in (single.app.target, cluster.target):
        with grpc.insecure_channel(target) as ch:
            raw = ch.unary_unary("/adapterserve.v1.GenerationService/Generate")
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff", timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed adapterserve.v1.GenerateRequest" in err.value.details()
    # HTTP: the replica's OpenAI app answers, with the single server's bodies.
    status, body = _post(cluster.http + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    status, body = _post(cluster.http + "/v1/completions", {"model": "", "prompt": "x", "temperature": -1})
    assert status == 400 and json.loads(body)["error"]["param"] == "temperature"


def test_health_and_model_info(cluster, single):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(cluster.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _get(cluster.http + "/health") == (200, "SERVING")
    info = cluster.gen.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.name == single.app.model.name
    assert info.limits.max_resident_adapters == 2  # --max-adapters-per-replica feeds the engine's residency


def _loads_by_replica(cluster) -> dict[str, float]:
    """adapterserve_adapter_loads_total{result="ok"} summed per replica, from the cluster's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = _get(cluster.http + "/metrics")
    assert status == 200
    loads: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "adapterserve_adapter_loads_total" and s.labels.get("result") == "ok":
                loads[s.labels["replica"]] = loads.get(s.labels["replica"], 0.0) + s.value
    return loads


def test_affinity_after_warm_up(cluster):
    """4 adapters over 2 replicas x 2 slots: after warm-up >= 90% of requests find their adapter loaded.

    Warm-up: rounds over the 4 adapters until one round loads nothing (each adapter has landed and
    the routers have heard where; on a loaded host that news can take a few rounds), at most 8."""
    for warm in range(8):
        start = sum(_loads_by_replica(cluster).values())
        for name in AFFINITY_ADAPTERS:
            cluster.gen.Generate(make_request("hi", name, max_new_tokens=1), timeout=120)
        time.sleep(1.0)
        if warm >= 2 and sum(_loads_by_replica(cluster).values()) == start:
            break
    before = _loads_by_replica(cluster)
    assert len(before) == 2, before  # both replicas report, each under its own label
    order = [AFFINITY_ADAPTERS[(i * 7) % 4] for i in range(40)]
    for name in order:
        cluster.gen.Generate(make_request("hi", name, max_new_tokens=1), timeout=120)
    after = _loads_by_replica(cluster)
    loads = sum(after.values()) - sum(before.values())
    assert 1 - loads / len(order) >= 0.9, (before, after)


def _engine_replica_actors() -> list:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "#Engine#" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def _running_engine_replicas(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["Engine"]
    return dep.replica_states.get("RUNNING", 0) if dep.status == "HEALTHY" else 0


def _wait_for_replicas(cluster, n: int, timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while _running_engine_replicas(engine_app_name(cluster.cfg)) < n:
        assert time.monotonic() < end, f"Serve did not bring {n} engine replicas back within {timeout_s:g} s"
        time.sleep(1.0)
    time.sleep(1.0)  # the routers hear of a new replica from the controller shortly after it runs


class Outcomes:
    """Outcomes of calls run on threads: "OK", or the status name of a grpc.RpcError / AdapterServeError."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def recorded(self, call):
        """`call` (run on a thread) with its outcome appended to `seen`."""
        from clients.errors import AdapterServeError

        def run(*args) -> None:
            try:
                call(*args)
                result = "OK"
            except grpc.RpcError as e:
                result = e.code().name
            except AdapterServeError as e:
                result = e.code.name
            with self._lock:
                self.seen.append(result)

        return run


def _kill_a_replica_under(threads: list[threading.Thread], started: threading.Event) -> None:
    """Start `threads`, kill one engine replica once `started` is set, and check that every call ended
    (none hangs after its replica was killed)."""
    for t in threads:
        t.start()
    assert started.wait(60)
    ray.kill(_engine_replica_actors()[0], no_restart=True)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a call hung after its replica was killed"


def test_replica_killed_under_load(cluster):
    """Kill one engine replica mid-load: every unary call answers OK or UNAVAILABLE, every stream ends
    with OK or UNAVAILABLE (never a hang), and Serve brings the replica back, serving again."""
    outcomes = Outcomes()
    started = threading.Event()

    @outcomes.recorded
    def stream(i: int) -> None:
        req = make_request("a long answer please", AFFINITY_ADAPTERS[i % 4], max_new_tokens=200, min_new_tokens=200)
        for _ in cluster.gen.GenerateStream(req, timeout=90):
            started.set()

    @outcomes.recorded
    def unary(i: int) -> None:
        cluster.gen.Generate(make_request("hi", AFFINITY_ADAPTERS[i % 4], max_new_tokens=40), timeout=90)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=unary, args=(i,)) for i in range(4)]
    _kill_a_replica_under(threads, started)
    assert len(outcomes.seen) == 8
    assert set(outcomes.seen) <= {"OK", "UNAVAILABLE"}, outcomes.seen
    _wait_for_replicas(cluster, 2)
    for name in AFFINITY_ADAPTERS:  # both replicas serve again (each adapter lands on one of them)
        assert cluster.gen.Generate(make_request("hi", name, max_new_tokens=2), timeout=120).token_ids
    assert _get(cluster.http + "/health") == (200, "SERVING")


def test_health_is_not_serving_when_no_replica_can_serve(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(cluster.channel)
    for victim in _engine_replica_actors():
        ray.kill(victim, no_restart=True)
    end = time.monotonic() + 30
    while health.Check(health_pb2.HealthCheckRequest(), timeout=30).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < end, "health stayed SERVING with every replica dead"
        time.sleep(0.2)
    assert _get(cluster.http + "/health") == (503, "NOT_SERVING")
    end = time.monotonic() + 300
    while health.Check(health_pb2.HealthCheckRequest(), timeout=30).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < end, "Serve did not bring the replicas back"
        time.sleep(1.0)
    _wait_for_replicas(cluster, 2)
    assert cluster.gen.Generate(_greedy("lora"), timeout=120).token_ids


def test_client_works_unchanged(cluster):
    """AdapterServeClient against the cluster's gRPC proxy, no extra option."""
    from clients.client import AdapterServeClient

    with AdapterServeClient(cluster.target) as client:
        assert client.health() == "SERVING"
        result = client.generate("hello", adapter="lora", max_new_tokens=3, temperature=0)
        assert len(result.token_ids) == 3
        chunks = list(client.stream("hello", adapter="lora", max_new_tokens=3, temperature=0))
        assert [t for c in chunks for t in c.token_ids] == list(result.token_ids)
def _on_every_replica(cluster, adapter_id: str) -> list:
    """Generate for `adapter_id` on every engine replica (broadcast, bypassing the router): token ids
    per replica, or the RpcStatus a replica answered."""
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name=engine_app_name(cluster.cfg))
    data = _greedy(adapter_id).SerializeToString()
    answers = handle.options(multiplexed_model_id=adapter_id).broadcast("generate", data).results(
        timeout_s=120, return_exceptions=True)
    return [list(pb.GenerateResponse.FromString(a).token_ids) if isinstance(a, bytes) else a for a in answers]


def test_register_replace_unregister_reach_every_replica(cluster, single):
    _wait_for_replicas(cluster, 2)
    lora = list(single.gen.Generate(_greedy("lora"), timeout=60).token_ids)
    dora = list(single.gen.Generate(_greedy("dora"), timeout=60).token_ids)
    assert lora != dora
    cluster.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="fresh", path="lora"), timeout=120)
    assert _on_every_replica(cluster, "fresh") == [lora, lora]  # both replicas now hold it
    listed = cluster.adapters.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters
    assert [a.adapter_id for a in listed].count("fresh") == 1
    assert cluster.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="fresh"), timeout=60).type == pb.LORA
    with pytest.raises(grpc.RpcError) as err:  # the store refuses a second registration, as the server does
        cluster.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="fresh", path="dora"), timeout=120)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    cluster.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="fresh", path="dora", replace=True),
                                     timeout=120)
    assert _on_every_replica(cluster, "fresh") == [dora, dora]  # no replica kept the old weights
    assert list(cluster.gen.Generate(_greedy("fresh"), timeout=120).token_ids) == dora
    cluster.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="fresh"), timeout=120)
    gone = _on_every_replica(cluster, "fresh")
    assert len(gone) == 2 and all(getattr(g, "code_name", None) == "NOT_FOUND" for g in gone), gone
    with pytest.raises(grpc.RpcError) as err:
        cluster.gen.Generate(_greedy("fresh"), timeout=120)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        cluster.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="fresh"), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        cluster.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="fresh"), timeout=120)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_http_admin_writes_the_store(cluster, single):
    prefix = single.generate("the cluster serves adapters", "prefix", max_new_tokens=6, temperature=0)
    status, body = _post(cluster.http + "/v1/load_lora_adapter", {"lora_name": "viahttp", "lora_path": "prefix"})
    assert status == 200, body
    doc = {"model": "viahttp", "prompt": "the cluster serves adapters", "max_tokens": 6, "temperature": 0}
    status, body = _post(cluster.http + "/v1/completions", doc)
    assert status == 200 and json.loads(body)["choices"][0]["text"] == prefix.text
    status, body = _post(cluster.http + "/v1/unload_lora_adapter", {"lora_name": "viahttp"})
    assert status == 200, body
    status, body = _post(cluster.http + "/v1/completions", doc)
    assert status == 404, body


def test_sigterm_stops_the_cluster_cleanly(cluster):
    """SIGTERM to `python -m server.cluster` (the last test: it stops the module's cluster): a stream in
    flight finishes with every token, the process exits 0 within a bound, and none of the Ray and
    Serve processes it started (GCS, raylet, controller, proxy, replicas) remains."""
    import psutil

    started = psutil.Process(cluster.proc.pid).children(recursive=True)
    names = " ".join(p.name() for p in started)
    assert "raylet" in names and "ServeController" in names, names
    _sigterm_with_a_stream_in_flight(cluster, started)


def _sigterm_with_a_stream_in_flight(cluster, started: list, metadata: tuple | None = None) -> None:
    """SIGTERM the cluster once a 200-token stream (sent with `metadata`) has its first token: the stream
    finishes with every token, the process exits 0 within STOP_BOUND_S, none of `started` remains."""
    import psutil

    outcome: list = []
    first = threading.Event()

    def stream() -> None:
        tokens = 0
        try:
            req = make_request("a long answer please", "lora", max_new_tokens=200, min_new_tokens=200)
            for chunk in cluster.gen.GenerateStream(req, metadata=metadata, timeout=120):
                tokens += len(chunk.token_ids)
                first.set()
            outcome.append(("OK", tokens))
        except grpc.RpcError as e:
            outcome.append((e.code().name, tokens))
        first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    ray.shutdown()  # this test's driver leaves the cluster's Ray first
    cluster.proc.send_signal(signal.SIGTERM)
    try:
        code = cluster.proc.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_BOUND_S} s after SIGTERM:\n{cluster.log_tail()}")
    assert code == 0, cluster.log_tail()
    reader.join(30)
    assert outcome == [("OK", 200)]  # in flight at SIGTERM: finished within --grace-seconds
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not [p for p in alive if _running(p)], alive


def _running(p) -> bool:
    """Still running (a zombie waiting for init to reap it is not)."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
