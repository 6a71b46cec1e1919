"""Every HTTP error status as the openai client's typed exception; auth, admin, /v1/models, health, disconnect."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import socket
import threading
import time

import httpx2 as httpx
import openai
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.http.conftest import async_client, base_url, client

MSG = [{"role": "user", "content": "hi"}]


def wait_until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 100000}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 9}, "n"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stop": [""]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"extra_body": {"min_tokens": 3}}, "min_tokens"),
    ({"extra_body": {"min_tokens": 2**32}}, "min_tokens"),  # past the proto's uint32: refused, never wrapped
    ({"max_tokens": 2**32}, "max_tokens"),
    ({"extra_body": {"top_k": 2**32}}, "top_k"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
])
def test_bad_chat_input_is_400_naming_the_field(http, kwargs, param):
    c = client(http)
    body = {"model": "", "messages": MSG, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert e.value.body["message"].startswith(param), e.value.body
    assert e.value.type == "invalid_request_error"


@pytest.mark.parametrize("kwargs, param", [
    ({"echo": True}, "echo"),
    ({"suffix": "x"}, "suffix"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"logprobs": 6}, "logprobs"),
])
def test_bad_completion_input_is_400_naming_the_field(http, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(http).completions.create(**{"model": "", "prompt": "hi", "max_tokens": 2, **kwargs})
    assert e.value.param == param, e.value.body


def test_unknown_model_is_404_model_not_found_and_unknown_fields_are_ignored(http):
    c = client(http)
    for model in ("nope", "base:nope", "nope:lora"):
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model=model, messages=MSG, max_tokens=2)
        assert e.value.code == "model_not_found" and e.value.param == "model"
    ok = c.chat.completions.create(model="", messages=MSG, max_tokens=2, extra_body={"some_future_field": 1})
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_models_follow_register_and_unregister_over_both_protocols(http):
    c = client(http)
    base = c.models.list().data[0]
    assert [m.id for m in c.models.list().data] == [base.id] and base.parent is None
    http.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="a1", path="lora"))
    url = base_url(http)
    files = {"config_json": (http.app.cfg.adapter_root + "/prompt/adapter_config.json"),
             "weights": (http.app.cfg.adapter_root + "/prompt/adapter_model.safetensors")}
    body = {"id": "a2", "files": {"config_json": open(files["config_json"]).read(),
                                  "safetensors_b64": base64.b64encode(open(files["weights"], "rb").read()).decode()}}
    r = httpx.post(url + "/adapters", json=body)
    assert r.status_code == 200 and r.json()["adapter_id"] == "a2" and r.json()["type"] == "PROMPT_TUNING", r.text
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {base.id, "a1", "a2"}
    assert models["a1"].parent == base.id and models["a1"].owned_by == "adapterserve" and models["a1"].created > 0
    assert {a["adapter_id"] for a in httpx.get(url + "/adapters").json()["data"]} == {"a1", "a2"}
    assert httpx.get(url + "/adapters/a1").json()["type"] == "LORA"
    assert httpx.delete(url + "/adapters/a1").json()["deleted"] is True
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    assert [m.id for m in c.models.list().data] == [base.id]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="a1", prompt="hi", max_tokens=2)
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "a2"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    for path in ("../lora", "/etc", "missing"):  # the same containment rules as gRPC
        r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_tokens_401_admin_403_and_health_metrics_stay_public(start_http):
    srv = start_http(auth_token="user-tok", admin_token="admin-tok")
    url = base_url(srv)
    with pytest.raises(openai.AuthenticationError):
        client(srv).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(srv, api_key="wrong").chat.completions.create(model="", messages=MSG, max_tokens=2)
    assert client(srv, api_key="user-tok").chat.completions.create(model="", messages=MSG, max_tokens=2).choices
    assert client(srv, api_key="admin-tok").models.list().data  # the admin token works wherever the plain one does
    with pytest.raises(openai.PermissionDeniedError):
        client(srv, api_key="user-tok").post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "lora"},
                                             cast_to=object)
    hdr = {"Authorization": "Bearer user-tok"}
    assert httpx.delete(url + "/adapters/x", headers=hdr).status_code == 403
    assert httpx.get(url + "/adapters", headers=hdr).status_code == 200
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "lora"},
                   headers={"Authorization": "Bearer admin-tok"})
    assert r.status_code == 200, r.text
    root = f"http://127.0.0.1:{srv.app.http_port}"
    assert httpx.get(root + "/health").status_code == 200
    assert "adapterserve_api_requests_total" in httpx.get(root + "/metrics").text


def test_queue_full_is_429_and_body_over_the_limit_is_413(start_http):
    srv = start_http(max_queue=1, max_batch_size=1, max_message_bytes=4096)

    async def flood():
        ac = async_client(srv)
        calls = [ac.completions.create(model="", prompt="hi", max_tokens=60, extra_body={"ignore_eos": True})
                 for _ in range(6)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        await ac.close()
        return out

    results = asyncio.run(flood())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert limited and all(not isinstance(r, Exception) or isinstance(r, openai.RateLimitError) for r in results)
    assert "queue" in limited[0].message
    with pytest.raises(openai.APIStatusError) as e:
        client(srv).completions.create(model="", prompt="x" * 5000, max_tokens=2)
    assert e.value.status_code == 413 and "max-message-bytes" in e.value.message


@pytest.mark.parametrize("stream, n", [(True, 1), (False, 1), (True, 3)], ids=["stream", "response", "stream-n3"])
def test_client_disconnect_frees_kv_within_one_engine_step(http, monkeypatch, stream, n):
    """Counted in engine steps, not seconds: the engine is held inside a forward while the client goes
    away; the disconnect must reach the engine request meanwhile (no further token needed to notice it),
    and its pages are free once that one step ends."""
    app = http.app
    engine = app.engine
    hold, entered, go_on = threading.Event(), threading.Event(), threading.Event()
    forward = engine.runtime.forward

    def held_forward(step, cache):
        if hold.is_set():
            hold.clear()
            entered.set()
            assert go_on.wait(60)
        return forward(step, cache)

    monkeypatch.setattr(engine.runtime, "forward", held_forward)
    body = json.dumps({"model": "", "prompt": "the quick brown fox", "max_tokens": 200, "stream": stream,
                       "ignore_eos": True, "n": n, "temperature": 1.0}).encode()
    sock = socket.create_connection(("127.0.0.1", app.http_port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    if stream:
        got = b""
        while got.count(b"data: ") < 3:  # a few tokens streamed: the request is running
            got += sock.recv(4096)
            assert b"200 OK" in got, got
    wait_until(lambda: len(engine.running) == n and all(len(r.output_ids) >= 3 for r in engine.running))
    reqs = list(engine.running)
    hold.set()
    assert entered.wait(30)  # the engine is inside a step's forward, and stays there
    steps = engine.steps
    assert engine.allocator.usage() > 0
    sock.close()
    wait_until(lambda: all(r.cancelled.is_set() for r in reqs))  # reached the engine while that step runs
    go_on.set()
    wait_until(lambda: not engine.running and engine.allocator.usage() == 0)
    assert engine.steps - steps <= 1, "KV must be freed within one engine step of the disconnect"
    assert all(r.finished and r.pages == [] for r in reqs)
    get = app.metrics.registry.get_sample_value
    wait_until(lambda: get("adapterserve_api_requests_total", {"api": "http", "status": "CANCELLED"}) == n)


def test_shutdown_phases_over_http_are_grpcs_accept_while_draining_then_503_in_flight_finish(start_http):
    """SIGTERM's phases (ServerApp.shutdown): 1. --drain-seconds: /health 503, completions still accepted;
    2. --grace-seconds: new completions 503, in-flight ones (those accepted while draining too) finish;
    3. the listener closes."""
    srv = start_http()
    app = srv.app
    root = f"http://127.0.0.1:{app.http_port}"
    assert httpx.get(root + "/health").text == "SERVING"
    stream = iter(client(srv).completions.create(model="", prompt="hi", max_tokens=60, stream=True,
                                                 extra_body={"ignore_eos": True}))
    next(stream)
    resume = threading.Event()
    app.engine.commands.call(lambda: resume.wait(60))  # the engine pauses: requests stay in flight
    done = asyncio.run_coroutine_threadsafe(app.shutdown(grace=60, drain=3), app._loop)  # what SIGTERM does
    wait_until(lambda: not app.serving())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert httpx.get(root + "/health").status_code == 503  # 1. draining: load balancers route elsewhere
        late = pool.submit(client(srv).completions.create, model="", prompt="hi", max_tokens=5,
                           extra_body={"ignore_eos": True})
        wait_until(lambda: len(app.engine.waiting) == 1 or late.done())  # ... yet a new completion is accepted
        assert not late.done(), late.exception()
        wait_until(lambda: app.engine._closed is not None)  # 2. --drain-seconds over: new completions refused
        with pytest.raises(openai.InternalServerError) as e:
            client(srv).completions.create(model="", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and "shutting down" in e.value.message
        assert httpx.get(root + "/health").status_code == 503
        resume.set()
        assert late.result(60).choices[0].finish_reason == "length"  # accepted while draining: answered in full
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length" and len(rest) == 60  # 59 tokens left + the finish
    done.result(60)
    with pytest.raises(httpx.ConnectError):  # 3. stopped listening
        httpx.get(root + "/health")


def test_a_stream_still_running_when_grace_ends_gets_a_503_error_event(start_http):
    srv = start_http()
    app = srv.app
    stream = iter(client(srv).completions.create(model="", prompt="hi", max_tokens=200, stream=True,
                                                 extra_body={"ignore_eos": True}))
    next(stream)
    resume = threading.Event()
    app.engine.commands.call(lambda: resume.wait(60))
    done = asyncio.run_coroutine_threadsafe(app.shutdown(grace=0, drain=0), app._loop)
    wait_until(lambda: app.engine._closed is not None)
    resume.set()  # the cut (an engine command queued behind the pause) comes before the stream's last token
    with pytest.raises(openai.APIError) as e:  # the client raises on an SSE event carrying `error`
        list(stream)
    assert "--grace-seconds" in e.value.message, e.value.message
    done.result(60)


def test_same_tls_options_as_grpc_mutual_tls(start_http, certs):
    import ssl

    srv = start_http(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca))
    url = f"https://127.0.0.1:{srv.app.http_port}/v1"
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=30, http_client=httpx.Client(verify=ctx))
    assert c.completions.create(model="", prompt="hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")
    no_cert = ssl.create_default_context(cafile=str(certs.ca))
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=30,
                      http_client=httpx.Client(verify=no_cert)).models.list()
    with pytest.raises(openai.APIConnectionError):  # plaintext to a TLS port
        openai.OpenAI(base_url=url.replace("https", "http"), api_key="x", max_retries=0, timeout=30).models.list()
