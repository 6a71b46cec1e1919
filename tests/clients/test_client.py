"""The Python clients against a server: results, streaming, adapters, errors, retries, deadlines.

Tests taking only ``served`` hold for any adapterserve server; those taking ``fake`` rely on
the fake's echo behaviour and instrumentation (see tests/clients/fake_server.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from clients import (
    AdapterInfo,
    AdapterServeClient,
    AdapterServeError,
    AlreadyExistsError,
    AsyncAdapterServeClient,
    DeadlineExceededError,
    GenerationResult,
    InternalError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    collect,
)
from clients._common import build_generate_request, build_register_request, engine_metadata
from clients.errors import error_class

FINISH = {"length", "stop", "eos"}


@pytest.fixture
def client(served):
    with AdapterServeClient(served.target, token=served.token or None, timeout=30) as c:
        yield c


@pytest.fixture
def admin(served):
    with AdapterServeClient(served.target, token=served.writer_token, timeout=30) as c:
        yield c


@pytest.fixture
def registered(admin, adapter_dir):
    """A freshly registered adapter id, unregistered afterwards."""
    adapter_id = f"t-{uuid.uuid4().hex[:8]}"
    admin.register_adapter(adapter_id, local_dir=adapter_dir)
    yield adapter_id
    try:
        admin.unregister_adapter(adapter_id)
    except NotFoundError:
        pass


# ---------------------------------------------------------------- any server


def test_health_and_model_info(client):
    assert client.health() == "SERVING"
    info = client.model_info()
    assert isinstance(info, ModelInfo) and info.vocab_size > 0 and info.limits.max_batch_size > 0
    assert info.kernels.dtype == info.dtype and info.kernels.matmul in ("onednn", "blas")
    assert "avx2" in info.kernels.cpu_features or info.kernels.cpu_capability != "AVX2"


def test_generate_result(client):
    r = client.generate("Hello there", max_new_tokens=4, request_id="req-42")
    assert isinstance(r, GenerationResult)
    assert r.finish_reason in FINISH and r.request_id == "req-42"
    assert r.completion_tokens == len(r.token_ids) <= 4 and r.prompt_tokens > 0
    assert r.usage.completion_tokens == r.completion_tokens and r.timings.total_ms >= 0


def test_generate_inputs(client):
    for kw in ({"messages": [{"role": "user", "content": "Hi"}]}, {"messages": [("user", "Hi")]},
               {"token_ids": [72, 105, 33]}):
        assert client.generate(**kw, max_new_tokens=2).finish_reason in FINISH


def test_logprobs(client):
    r = client.generate("Hello", max_new_tokens=3, top_logprobs=2)
    assert len(r.logprobs) == r.completion_tokens
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in r.logprobs)


def test_stream_equals_generate(client):
    whole = client.generate("Count: one two", max_new_tokens=8)
    chunks = list(client.stream("Count: one two", max_new_tokens=8))
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    joined = collect(chunks)
    assert (joined.text, joined.token_ids, joined.finish_reason) == (whole.text, whole.token_ids, whole.finish_reason)
    assert joined.completion_tokens == whole.completion_tokens


def test_adapter_lifecycle(admin, client, adapter_dir):
    adapter_id = f"life-{uuid.uuid4().hex[:8]}"
    info = admin.register_adapter(adapter_id, local_dir=adapter_dir, pin=True)
    assert isinstance(info, AdapterInfo) and info.adapter_id == adapter_id
    assert (info.type, info.pinned) == ("lora", True) and info.rank > 0 and info.size_bytes > 0
    assert adapter_id in [a.adapter_id for a in client.list_adapters()]
    assert client.get_adapter(adapter_id).state in {"registered", "resident", "merged"}
    r = client.generate("Hi", adapter=adapter_id, max_new_tokens=3)
    assert r.adapter_id == adapter_id
    with pytest.raises(AlreadyExistsError):
        admin.register_adapter(adapter_id, local_dir=adapter_dir)
    admin.register_adapter(adapter_id, local_dir=adapter_dir, replace=True)
    assert admin.unregister_adapter(adapter_id) == adapter_id
    with pytest.raises(NotFoundError, match=adapter_id):
        client.get_adapter(adapter_id)


def test_unknown_adapter_is_not_found(client):
    with pytest.raises(NotFoundError) as err:
        client.generate("Hi", adapter="no-such-adapter", max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in err.value.message
    with pytest.raises(NotFoundError):
        list(client.stream("Hi", adapter="no-such-adapter"))


def test_invalid_argument_carries_the_servers_message(client):
    with pytest.raises(InvalidArgumentError, match="top_logprobs") as err:
        client.generate("Hi", top_logprobs=21)
    assert str(err.value).startswith("INVALID_ARGUMENT: ")
    with pytest.raises(InvalidArgumentError, match="temperature"):
        client.generate("Hi", temperature=-1)


def test_async_client(served, registered):
    async def go():
        async with AsyncAdapterServeClient(served.target, token=served.token or None) as c:
            assert await c.health() == "SERVING"
            results = await asyncio.gather(*(c.generate("Hi", adapter=a, max_new_tokens=3)
                                             for a in (None, registered, registered)))
            assert [r.adapter_id for r in results] == ["", registered, registered]
            chunks = [ch async for ch in c.stream("Hi", adapter=registered, max_new_tokens=3)]
            assert collect(chunks).text == results[1].text
            assert registered in [a.adapter_id for a in await c.list_adapters()]
            assert (await c.get_adapter(registered)).adapter_id == registered
            assert (await c.model_info()).vocab_size > 0
            with pytest.raises(NotFoundError):
                await c.generate("Hi", adapter="no-such-adapter")

    asyncio.run(go())


# ---------------------------------------------------------------- the fake's echo and instrumentation


def test_request_fields_reach_the_server(fake, client):
    r = client.generate("hello world", adapter=None, stop=["wor"])
    assert (r.text, r.finish_reason) == ("base: hello ", "stop")
    r = client.generate("hello", max_new_tokens=3)
    assert (r.text, r.finish_reason, r.token_ids) == ("bas", "length", [98, 97, 115])


def test_retry_idempotent_calls_on_unavailable(fake, served):
    with AdapterServeClient(served.target, token=served.token, retries=3) as c:
        fake.fail_next["ListAdapters"] = 2
        n = fake.calls["ListAdapters"]
        c.list_adapters()
        assert fake.calls["ListAdapters"] == n + 3
        fake.fail_next["GetModelInfo"] = 5
        with pytest.raises(UnavailableError, match="injected outage"):
            c.model_info()
        assert fake.fail_next["GetModelInfo"] == 1  # 1 try + 3 retries


@pytest.mark.parametrize("call", ["Generate", "GenerateStream", "RegisterAdapter", "UnregisterAdapter"])
def test_no_retry_for_non_idempotent_calls(fake, served, adapter_dir, call):
    with AdapterServeClient(served.target, token=served.writer_token, retries=3) as c:
        fake.fail_next[call] = 1
        n = fake.calls[call]
        with pytest.raises(UnavailableError):
            {"Generate": lambda: c.generate("hi"), "GenerateStream": lambda: list(c.stream("hi")),
             "RegisterAdapter": lambda: c.register_adapter("x", local_dir=adapter_dir),
             "UnregisterAdapter": lambda: c.unregister_adapter("x")}[call]()
        assert fake.calls[call] == n + 1


def test_engine_app_routes_generation_and_retries_generate_once(fake, served):
    """engine_app (a cluster's engine application): Generate/GenerateStream carry Serve's routing
    metadata, and a unary Generate is retried once on UNAVAILABLE (a replica lost mid-call)."""
    assert engine_metadata(None, build_generate_request("x", adapter="a")) == ()
    assert engine_metadata("as-engine", build_generate_request("x", adapter="a")) == (
        ("application", "as-engine"), ("multiplexed_model_id", "a"))
    assert engine_metadata("as-engine", build_generate_request("x", adapter={"b": 0.5, "c": 1.0})) == (
        ("application", "as-engine"), ("multiplexed_model_id", "b"))  # a mix: routed by its first adapter
    assert engine_metadata("as-engine", build_generate_request("x")) == (("application", "as-engine"),)
    for unsendable in ("a\x00b", "é-adapter", "tab\there"):  # not metadata-safe: routed without the id
        assert engine_metadata("as-engine", build_generate_request("x", adapter=unsendable)) == (
            ("application", "as-engine"),)
    with AdapterServeClient(served.target, token=served.token, engine_app="as-engine") as c:
        fake.fail_next["Generate"] = 1
        n = fake.calls["Generate"]
        assert c.generate("hi", adapter=None).text == "base: hi"
        assert fake.calls["Generate"] == n + 2
        assert ("application", "as-engine") in fake.metadata["Generate"]
        list(c.stream("hi", adapter={"m": 1.0, "n": 0.5}, max_new_tokens=1))
        assert {("application", "as-engine"), ("multiplexed_model_id", "m")} <= set(fake.metadata["GenerateStream"])
        c.list_adapters()
        assert not any(k == "application" for k, _ in fake.metadata["ListAdapters"])
        fake.fail_next["Generate"] = 2
        with pytest.raises(UnavailableError):
            c.generate("hi")
        assert "".join(chunk.text for chunk in c.stream("hi")) == "base: hi"
        assert c.list_adapters() is not None  # other calls as before

    async def aio() -> str:
        async with AsyncAdapterServeClient(served.target, token=served.token, engine_app="as-engine") as c:
            fake.fail_next["Generate"] = 1
            return (await c.generate("hi")).text

    assert asyncio.run(aio()) == "base: hi"
    fake.fail_next.clear()


def test_lookaside_leases_then_generates_on_the_leased_replica(fake, served):
    """lookaside: a lease routed like engine_app's calls (through the engine application when given),
    then the generation on the address it names, with the token and the lease's id; the replica's
    statuses as they are; a replica UNAVAILABLE for a unary Generate: once more on a new lease."""
    from clients._common import LEASE_METADATA

    with AdapterServeClient(served.target, token=served.token, engine_app="as-engine", lookaside=True) as c:
        leases = fake.calls["Lease"]
        assert c.generate("hi").text == "base: hi"
        assert fake.calls["Lease"] == leases + 1
        assert (LEASE_METADATA, f"lease-{leases + 1}") in fake.metadata["Generate"]
        assert ("authorization", f"Bearer {served.token}") in fake.metadata["Generate"]
        assert "".join(chunk.text for chunk in c.stream("hi")) == "base: hi"
        assert (LEASE_METADATA, f"lease-{leases + 2}") in fake.metadata["GenerateStream"]
        with pytest.raises(NotFoundError):  # the leased replica's own answer
            c.generate("hi", adapter="no-such")
        assert {("application", "as-engine"), ("multiplexed_model_id", "no-such")} <= set(fake.metadata["Lease"])
        assert fake.calls["lease:no-such"] == 1
        fake.fail_next["Generate"] = 1
        before = fake.calls["Lease"]
        assert c.generate("hi").text == "base: hi"
        assert fake.calls["Lease"] == before + 2  # the retry took a new lease
        fake.fail_next["Generate"] = 2
        with pytest.raises(UnavailableError):
            c.generate("hi")
        fake.fail_next["Lease"] = 1
        with pytest.raises(UnavailableError):  # no lease, no generation
            c.generate("hi")
    with AdapterServeClient(served.target, token=served.token, lookaside=True) as c:  # no engine_app: the ingress
        assert c.generate("hi").text == "base: hi"
        assert not any(k == "application" for k, _ in fake.metadata["Lease"])

    async def aio() -> tuple[str, str]:
        async with AsyncAdapterServeClient(served.target, token=served.token, engine_app="as-engine",
                                           lookaside=True) as c:
            fake.fail_next["Generate"] = 1
            text = (await c.generate("hi")).text
            streamed = "".join([chunk.text async for chunk in c.stream("hi")])
            return text, streamed

    assert asyncio.run(aio()) == ("base: hi", "base: hi")
    fake.fail_next.clear()
    for make in (AdapterServeClient, AsyncAdapterServeClient):  # the replicas are plaintext: no silent downgrade
        with pytest.raises(ValueError, match="plaintext"):
            make(served.target, tls=True, lookaside=True)


def test_retries_stop_at_the_deadline(fake, served):
    with AdapterServeClient(served.target, token=served.token, retries=100, timeout=0.5) as c:
        fake.fail_next["ListAdapters"] = 1000
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            c.list_adapters()
        assert time.monotonic() - t0 < 1.5
    fake.fail_next.clear()


def test_deadline_cancels_the_request(fake, client):
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.generate("__slow__", request_id="slow-1", timeout=0.3)
    assert time.monotonic() - t0 < 2
    _wait_for(lambda: "slow-1" in fake.state.cancelled)


def test_leaving_a_stream_early_cancels_it(fake, client):
    for chunk in client.stream("__slow_stream__", request_id="early-1"):
        assert chunk.text == "first"
        break
    _wait_for(lambda: "early-1" in fake.state.cancelled)


def test_error_mid_stream(fake, client):
    got = []
    with pytest.raises(InternalError, match="engine step failed"):
        for chunk in client.stream("__midstream_error__"):
            got.append(chunk.text)
    assert got == ["partial"]


def test_resource_exhausted_and_unavailable_are_typed(fake, client):
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        client.generate("__exhausted__")
    n = fake.calls["Generate"]
    with pytest.raises(UnavailableError):
        client.generate("__unavailable__")
    assert fake.calls["Generate"] == n + 1


def test_upload_sends_the_folder_bytes(fake, admin, adapter_dir):
    admin.register_adapter("upload-check", local_dir=adapter_dir, replace=True, merge=True)
    files = fake.state.uploads["upload-check"]
    assert files.config_json == (adapter_dir / "adapter_config.json").read_bytes()
    assert files.safetensors == (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert admin.get_adapter("upload-check").merged
    admin.unregister_adapter("upload-check")


def test_health_not_serving(fake, client):
    fake.set_health("NOT_SERVING")
    try:
        assert client.health() == "NOT_SERVING"
    finally:
        fake.set_health("SERVING")


def test_wait_ready(fake, client):
    client.wait_ready(timeout=2)
    fake.set_health("NOT_SERVING")
    try:
        with pytest.raises(UnavailableError, match="NOT_SERVING"):
            client.wait_ready(timeout=0.3, interval=0.05)
    finally:
        fake.set_health("SERVING")


# ---------------------------------------------------------------- no server


def test_unreachable_server_is_unavailable():
    with AdapterServeClient("127.0.0.1:1", retries=1, timeout=3) as c:
        with pytest.raises(UnavailableError):
            c.health()
        with pytest.raises(UnavailableError):
            c.generate("hi")


def test_request_building():
    req = build_generate_request("p", adapter="a", max_new_tokens=5, temperature=0.0, seed=3, stop="x",
                                 top_logprobs=2)
    assert req.params.HasField("temperature") and req.params.temperature == 0.0
    assert not req.params.HasField("top_p") and list(req.params.stop) == ["x"]
    assert req.return_logprobs and req.adapter_id == "a" and req.WhichOneof("input") == "prompt"
    with pytest.raises(ValueError, match="exactly one"):
        build_generate_request()
    with pytest.raises(ValueError, match="exactly one"):
        build_generate_request("p", token_ids=[1])


def test_register_request_checks_the_folder(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_register_request("a", None, None, False, False, False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        build_register_request("a", None, tmp_path, False, False, False)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        build_register_request("a", None, tmp_path, False, False, False)
    assert build_register_request("a", "rel/dir", None, True, True, True).path == "rel/dir"


def test_error_classes():
    assert error_class(grpc.StatusCode.NOT_FOUND) is NotFoundError
    assert error_class(grpc.StatusCode.DATA_LOSS) is AdapterServeError
    e = NotFoundError("adapter 'x' is not registered")
    assert (e.code, e.message, str(e)) == (grpc.StatusCode.NOT_FOUND, "adapter 'x' is not registered",
                                           "NOT_FOUND: adapter 'x' is not registered")


def _wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_weighted_mix_requests_and_cli_adapter_syntax():
    from clients._common import build_generate_request, parse_adapter

    req = build_generate_request("hi", adapter={"a": 0.5, "b": -1.0})
    assert req.adapter_id == "" and [(p.adapter_id, p.weight) for p in req.adapters] == [("a", 0.5), ("b", -1.0)]
    assert build_generate_request("hi", adapter="a").adapter_id == "a"
    assert parse_adapter("a=0.5,b=-1") == {"a": 0.5, "b": -1.0}
    assert parse_adapter("poet") == "poet" and parse_adapter("") is None
