"""The metrics a REAL server exposes: drive it over gRPC with a known load, scrape its /metrics.

Each server here has its own registry, so absolute values are exact; the load tests still
compare against a scrape taken just before the load (deltas), so registration traffic and
anything the server does at start cannot leak into the request numbers.

Time: ~10-20 s on a 2-core CPU (tiny model, four PEFT adapters built once, one Prometheus).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.v1 import adapterserve_pb2 as pb
from server.app import ServerApp
from server.config import ServerConfig, parse_config
from server.request_log import configure_logging
from tests.metrics.prometheus_harness import free_port, http_get, promtool_check_metrics, running_prometheus
from tests.peft_reference import make_peft_adapter
from tests.serving import Running, make_request

OK = "OK"
LONG = 200  # max_new_tokens of requests that must still be running when cut off


# ----------------------------------------------------------------------------------------- helpers
class Scrape:
    """One /metrics exposition, parsed: sample name + labels -> value."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def series(self, name: str) -> dict[frozenset, float]:
        """Every series of sample ``name``: labels -> value."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def total(self, name: str, **match: str) -> float:
        """Sum of ``name`` over every series whose labels include ``match``."""
        return sum(v for labels, v in self.series(name).items() if set(match.items()) <= labels)


def scrape(app: ServerApp, accept: str | None = None) -> Scrape:
    _, _, body = http_get(f"http://127.0.0.1:{app.metrics_port}/metrics", {"Accept": accept} if accept else None)
    return Scrape(body.decode())


def wait_until(check: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    """Poll ``check``: the server records a request in its RPC's ``finally``, just after the client sees the end."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def settle(app: ServerApp) -> None:
    """Wait until the engine is idle and has run a full loop since (so every step is observed)."""
    wait_until(lambda: app.engine.num_active() == 0, what="engine idle")
    app.engine.call(lambda: None).result(10)  # runs between two loop iterations: the last step was reported
    app.engine.call(lambda: None).result(10)


def ids(n: int, start: int = 5) -> list[int]:
    """``n`` prompt token ids (plain ids below the tiny vocabulary, never special)."""
    return [start + i for i in range(n)]


def request(rid: str, adapter: str, prompt_len: int, max_new: int, **params) -> pb.GenerateRequest:
    req = make_request(token_ids=ids(prompt_len), adapter_id=adapter, max_new_tokens=max_new, ignore_eos=True, **params)
    req.request_id = rid
    return req


def register(srv: Running, adapter_id: str, path: str, **kw) -> pb.Adapter:
    return srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path, **kw), timeout=60)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_factory):
    """PEFT adapters saved by PEFT itself on the tiny llama: two LoRA, one prefix, one prompt tuning."""
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("metrics-adapters")
    make_peft_adapter(base, root / "lora", "lora", seed=1)
    make_peft_adapter(base, root / "lora2", "lora", seed=2, r=2, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(base, root / "prefix", "prefix", seed=3)
    make_peft_adapter(base, root / "prompt", "prompt", seed=4)
    return root


@pytest.fixture
def serve():
    """serve(model_dir, **config) -> Running with the /metrics listener on a free port; stopped at teardown."""
    started: list[Running] = []

    def start(model_dir, **overrides) -> Running:
        error: Exception | None = None
        for _ in range(3):  # the probed metrics port can be taken before the server binds it
            cfg = ServerConfig(model=str(model_dir), port=0, metrics_port=free_port(), http_port=0, threads=2, **overrides)
            cfg.validate()
            app = ServerApp(cfg)
            try:
                app.start()
            except OSError as e:
                app.engine.stop()
                error = e
                continue
            running = Running(app)
            started.append(running)
            return running
        raise AssertionError(f"could not start a server with a metrics port: {error}")

    yield start
    for r in started:
        r.close()


@pytest.fixture
def json_log():
    """The ``adapterserve`` logger tree as JSON lines into a StringIO; restored afterwards."""
    logger = logging.getLogger("adapterserve")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    yield stream
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved[0]:
        logger.addHandler(h)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def request_lines(stream: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [x for x in lines if x["logger"] == "adapterserve.requests"]


# ------------------------------------------------------------------------------------------- tests
def test_known_load_gives_exact_metrics_and_one_log_line_per_request(serve, tiny_llama, adapter_root, json_log):
    # Two resident slots for three adapters: the LRU order below makes hits, misses and evictions exact.
    srv = serve(tiny_llama, adapter_root=str(adapter_root), max_resident_adapters=2, kv_cache_tokens=4096,
                max_batch_size=8)
    app = srv.app
    fresh = scrape(app)
    for t in ("lora", "prefix_tuning", "prompt_tuning", "p_tuning"):
        assert fresh.get("adapterserve_adapters_registered", type=t) == 0
        assert fresh.get("adapterserve_adapter_loads_total", type=t, result="ok") == 0

    register(srv, "a-lora", "lora")  # resident: [a-lora]
    register(srv, "a-prefix", "prefix")  # resident: [a-lora, a-prefix]
    register(srv, "a-prompt", "prompt")  # full: evicts a-lora -> [a-prefix, a-prompt]
    reg = scrape(app)
    expect_registered = {"lora": 1, "prefix_tuning": 1, "prompt_tuning": 1, "p_tuning": 0}
    for t, n in expect_registered.items():
        assert reg.get("adapterserve_adapters_registered", type=t) == n, t
        assert reg.get("adapterserve_adapter_loads_total", type=t, result="ok") == n, t
        assert reg.get("adapterserve_adapter_loads_total", type=t, result="error") == 0, t
        assert reg.get("adapterserve_adapter_load_seconds_count", type=t) == n, t
    assert reg.get("adapterserve_adapters_resident", type="lora") == 0
    assert reg.get("adapterserve_adapters_resident", type="prefix_tuning") == 1
    assert reg.get("adapterserve_adapters_resident", type="prompt_tuning") == 1
    assert reg.get("adapterserve_adapter_evictions_total") == 1
    assert reg.get("adapterserve_adapter_cache_hits_total") == reg.get("adapterserve_adapter_cache_misses_total") == 0
    settle(app)
    before = scrape(app)

    # -- successful requests, one at a time: (request id, adapter, prompt tokens, max_new_tokens, stream)
    ok_load = [
        ("base-1", "", 5, 4, False),
        ("base-2", "", 7, 6, True),
        ("prefix-1", "a-prefix", 4, 3, False),  # hit  -> [a-prompt, a-prefix]
        ("prompt-1", "a-prompt", 6, 5, True),  # hit  -> [a-prefix, a-prompt]
        ("lora-1", "a-lora", 3, 7, False),  # miss: loads a-lora, evicts a-prefix -> [a-prompt, a-lora]
        ("lora-2", "a-lora", 9, 2, False),  # hit
        ("prompt-2", "a-prompt", 2, 1, False),  # hit (one token: no time-per-output-token) -> [a-lora, a-prompt]
    ]
    for rid, adapter, n_prompt, n_new, stream in ok_load:
        req = request(rid, adapter, n_prompt, n_new)
        if stream:
            chunks = list(srv.gen.GenerateStream(req, timeout=60))
            usage = chunks[-1].usage
        else:
            usage = srv.gen.Generate(req, timeout=60).usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, n_new), rid

    # -- exactly one failing request of each kind
    with pytest.raises(grpc.RpcError) as err:  # rejected by validation after tokenizing (4 prompt tokens)
        srv.gen.Generate(request("bad-1", "a-lora", 4, 3, temperature=-1.0), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # never tokenized: 0 prompt tokens
        srv.gen.Generate(request("missing-1", "no-such-adapter", 4, 3), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    call = srv.gen.GenerateStream(request("cancel-1", "a-lora", 5, LONG), timeout=60)  # hit -> [a-prompt, a-lora]
    next(call)
    next(call)
    app.engine.call(lambda: time.sleep(0.3))  # the request cannot finish before the cancel lands
    call.cancel()
    wait_until(lambda: scrape(app).get("adapterserve_requests_total", adapter="a-lora", status="CANCELLED") == 1,
               what="the cancelled request to be recorded")
    settle(app)

    call = srv.gen.GenerateStream(request("deadline-1", "a-prompt", 8, LONG), timeout=0.5)  # hit
    next(call)  # running and holding KV pages
    app.engine.call(lambda: time.sleep(0.8))  # a slow step: the deadline passes mid-request
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: scrape(app).get("adapterserve_requests_total", adapter="a-prompt",
                                       status="DEADLINE_EXCEEDED") == 1,
               what="the timed-out request to be recorded")
    settle(app)
    wait_until(lambda: scrape(app).get("adapterserve_kv_cache_usage_ratio") == 0, what="KV usage back to 0")
    after = scrape(app)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    def delta_total(name: str, **match: str) -> float:
        return after.total(name, **match) - before.total(name, **match)

    # -- requests_total{adapter,status}: every request exactly once, under the right status
    expect_requests = {
        ("_base", OK): 2, ("a-prefix", OK): 1, ("a-prompt", OK): 2, ("a-lora", OK): 2,
        ("a-lora", "INVALID_ARGUMENT"): 1, ("a-lora", "CANCELLED"): 1, ("a-prompt", "DEADLINE_EXCEEDED"): 1,
    }
    for (adapter, status), n in expect_requests.items():
        assert delta("adapterserve_requests_total", adapter=adapter, status=status) == n, (adapter, status)
    # an unknown id is counted under _other and never mints a label value of its own
    assert delta("adapterserve_requests_total", adapter="_other", status="NOT_FOUND") == 1
    assert delta_total("adapterserve_requests_total", adapter="_other") == 1  # 100 labels: no other overflow
    assert delta_total("adapterserve_requests_total") == sum(expect_requests.values()) + 1 == 11
    assert not any(("adapter", "no-such-adapter") in labels for _, labels in after.samples)

    # -- tokens: prompt tokens of every request that was tokenized (the invalid one too), generated
    # tokens exact for finished requests; partial output of the cut-off ones is bounded, and equal
    # to what the request log reports for them (checked below).
    assert delta("adapterserve_prompt_tokens_total", adapter="_base") == 5 + 7
    assert delta("adapterserve_prompt_tokens_total", adapter="a-prefix") == 4
    assert delta("adapterserve_prompt_tokens_total", adapter="a-prompt") == 6 + 2 + 8
    assert delta("adapterserve_prompt_tokens_total", adapter="a-lora") == 3 + 9 + 4 + 5
    assert delta("adapterserve_prompt_tokens_total", adapter="_other") == 0  # NOT_FOUND: never tokenized
    assert delta_total("adapterserve_prompt_tokens_total") == 12 + 4 + 16 + 21
    assert delta("adapterserve_generation_tokens_total", adapter="_base") == 4 + 6
    assert delta("adapterserve_generation_tokens_total", adapter="a-prefix") == 3
    cancel_tokens = delta("adapterserve_generation_tokens_total", adapter="a-lora") - (7 + 2)
    deadline_tokens = delta("adapterserve_generation_tokens_total", adapter="a-prompt") - (5 + 1)
    assert 2 <= cancel_tokens < LONG  # the client read two chunks, then cancelled
    assert 1 <= deadline_tokens < LONG  # the client read one chunk, then the deadline passed
    assert delta_total("adapterserve_generation_tokens_total") == 10 + 3 + 9 + 6 + cancel_tokens + deadline_tokens

    # -- latency histograms: duration for OK requests only; TTFT whenever a token came out;
    # time per output token for OK requests with more than one token
    expect_ok = {"_base": 2, "a-prefix": 1, "a-prompt": 2, "a-lora": 2}
    expect_ttft = {"_base": 2, "a-prefix": 1, "a-prompt": 3, "a-lora": 3}  # + the deadline / cancelled ones
    expect_tpot = {"_base": 2, "a-prefix": 1, "a-prompt": 1, "a-lora": 2}  # prompt-2 made one token
    for adapter in expect_ok:
        assert delta("adapterserve_request_duration_seconds_count", adapter=adapter) == expect_ok[adapter], adapter
        assert delta("adapterserve_request_duration_seconds_bucket", adapter=adapter, le="+Inf") == expect_ok[adapter]
        assert delta("adapterserve_request_duration_seconds_sum", adapter=adapter) > 0
        assert delta("adapterserve_time_to_first_token_seconds_count", adapter=adapter) == expect_ttft[adapter], adapter
        assert delta("adapterserve_time_per_output_token_seconds_count", adapter=adapter) == expect_tpot[adapter]
    for name in ("adapterserve_request_duration_seconds_count", "adapterserve_time_to_first_token_seconds_count",
                 "adapterserve_time_per_output_token_seconds_count"):
        assert delta(name, adapter="_other") == 0, name  # rejected: nothing observed

    # -- engine: 9 requests reached the engine (7 OK, cancelled, timed out), one at a time
    admitted = 9
    assert delta("adapterserve_queue_wait_seconds_count") == admitted
    prefills = delta("adapterserve_step_duration_seconds_count", phase="prefill")
    decodes = delta("adapterserve_step_duration_seconds_count", phase="decode")
    assert prefills == admitted  # sequential requests: one prefill step each
    ok_decodes = sum(n_new - 1 for *_, n_new, _ in ok_load)  # the first token comes from the prefill
    assert decodes >= ok_decodes + (2 - 1) + (1 - 1)
    assert delta("adapterserve_batch_size_count") == prefills + decodes  # one observation per step
    assert delta("adapterserve_batch_size_sum") >= prefills + decodes  # every step had >= 1 sequence
    assert delta("adapterserve_step_duration_seconds_sum", phase="prefill") > 0
    assert delta("adapterserve_step_duration_seconds_sum", phase="decode") > 0
    assert set(after.series("adapterserve_step_duration_seconds_count")) == {
        frozenset({("phase", "prefill")}), frozenset({("phase", "decode")})}
    assert after.get("adapterserve_running_requests") == 0
    assert after.get("adapterserve_waiting_requests") == 0
    assert after.get("adapterserve_kv_cache_usage_ratio") == 0
    assert delta("adapterserve_preemptions_total") == 0

    # -- adapter cache: 6 lookups hit, lora-1 missed (an on-demand load of a-lora, evicting a-prefix)
    assert delta("adapterserve_adapter_cache_hits_total") == 6
    assert delta("adapterserve_adapter_cache_misses_total") == 1
    assert delta("adapterserve_adapter_evictions_total") == 1
    assert delta("adapterserve_adapter_loads_total", type="lora", result="ok") == 1
    assert delta("adapterserve_adapter_loads_total", type="prefix_tuning", result="ok") == 0
    assert delta("adapterserve_adapter_loads_total", type="prompt_tuning", result="ok") == 0
    assert after.get("adapterserve_adapters_resident", type="lora") == 1
    assert after.get("adapterserve_adapters_resident", type="prefix_tuning") == 0
    assert after.get("adapterserve_adapters_resident", type="prompt_tuning") == 1
    for t, n in expect_registered.items():
        assert after.get("adapterserve_adapters_registered", type=t) == n, t

    # -- one structured log line per finished request, with the numbers the metrics counted
    lines = request_lines(json_log)
    by_id = {x["request_id"]: x for x in lines}
    assert len(lines) == len(by_id) == 11, [x["request_id"] for x in lines]
    for rid, adapter, n_prompt, n_new, _ in ok_load:
        x = by_id[rid]
        assert (x["adapter"], x["status"], x["prompt_tokens"], x["completion_tokens"]) == (
            adapter or "_base", OK, n_prompt, n_new), x
        assert x["msg"] == "request finished" and x["level"] == "INFO" and x["finish_reason"] == "LENGTH"
        assert 0 <= x["queue_ms"] <= x["ttft_ms"] <= x["total_ms"], x
    expect_failed = {  # request id -> (adapter, status, prompt tokens, completion tokens)
        "bad-1": ("a-lora", "INVALID_ARGUMENT", 4, 0),
        "missing-1": ("no-such-adapter", "NOT_FOUND", 0, 0),
        "cancel-1": ("a-lora", "CANCELLED", 5, cancel_tokens),
        "deadline-1": ("a-prompt", "DEADLINE_EXCEEDED", 8, deadline_tokens),
    }
    for rid, expected in expect_failed.items():
        x = by_id[rid]
        assert (x["adapter"], x["status"], x["prompt_tokens"], x["completion_tokens"]) == expected, x
        assert x["total_ms"] > 0 and x["level"] == "INFO", x
    for rid in ("bad-1", "missing-1"):
        assert by_id[rid]["ttft_ms"] is None and by_id[rid]["error"], by_id[rid]
    for rid in ("cancel-1", "deadline-1"):
        assert by_id[rid]["ttft_ms"] > 0, by_id[rid]


def test_bounded_labels_merged_adapter_build_info_through_the_server(serve, tiny_llama, adapter_root):
    srv = serve(tiny_llama, adapter_root=str(adapter_root), metrics_max_adapter_labels=2)
    app = srv.app
    assert app.metrics_port == app.cfg.metrics_port == app.metrics.http_port

    register(srv, "l1", "lora")
    register(srv, "p2", "prefix")
    register(srv, "m3", "lora2", merge=True)  # folded into the base weights
    s = scrape(app)
    assert s.series("adapterserve_merged_adapter_info") == {frozenset({("adapter", "m3")}): 1}
    assert s.get("adapterserve_adapters_registered", type="lora") == 2
    assert s.get("adapterserve_adapters_registered", type="prefix_tuning") == 1

    for adapter in ("l1", "p2", "m3", ""):  # one request each, first-come labels: l1, p2, then _other
        assert srv.generate(token_ids=ids(3), adapter_id=adapter, max_new_tokens=2, ignore_eos=True).usage \
            .completion_tokens == 2
    s = scrape(app)
    requests = s.series("adapterserve_requests_total")
    assert requests == {
        frozenset({("adapter", a), ("status", OK)}): 1.0 for a in ("l1", "p2", "_other", "_base")}, requests
    assert s.get("adapterserve_generation_tokens_total", adapter="_other") == 2
    assert s.get("adapterserve_prompt_tokens_total", adapter="_other") == 3
    assert s.get("adapterserve_request_duration_seconds_count", adapter="_other") == 1
    assert not any(("adapter", "m3") in labels for (name, labels) in s.samples if name != "adapterserve_merged_adapter_info")
    assert s.get("adapterserve_adapter_cache_hits_total") == 3  # all three resident (m3 merged)
    assert s.get("adapterserve_adapter_cache_misses_total") == 0

    srv.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="m3"), timeout=60)
    wait_until(lambda: not scrape(app).series("adapterserve_merged_adapter_info"), what="merged info cleared")
    s = scrape(app)
    assert s.get("adapterserve_adapters_registered", type="lora") == 1
    assert s.get("adapterserve_adapters_resident", type="lora") == 1
    assert s.get("adapterserve_adapter_loads_total", type="lora", result="ok") == 2

    build = s.series("adapterserve_build_info")
    assert len(build) == 1
    labels, value = next(iter(build.items()))
    labels = dict(labels)
    assert value == 1
    assert labels["model"] == str(tiny_llama) == app.model.name
    assert (labels["device"], labels["dtype"]) == ("cpu", "float32")
    assert labels["version"]
    assert s.get("adapterserve_process_cpu_seconds_total") == 0  # a private registry: no unprefixed copy
    assert s.has("process_cpu_seconds_total") and s.get("process_resident_memory_bytes") > 0

    # OpenMetrics when the scraper asks for it, on the server's own listener
    _, headers, body = http_get(f"http://127.0.0.1:{app.metrics_port}/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")


def test_real_prometheus_scrapes_the_server(serve, tiny_llama, adapter_root):
    srv = serve(tiny_llama, adapter_root=str(adapter_root))
    register(srv, "prom-lora", "lora")
    for n_new in (2, 3, 4):
        srv.generate(token_ids=ids(4), adapter_id="prom-lora", max_new_tokens=n_new, ignore_eos=True)
    srv.generate(token_ids=ids(4), max_new_tokens=1, ignore_eos=True)
    with pytest.raises(grpc.RpcError):
        srv.generate(token_ids=ids(4), adapter_id="prom-lora", max_new_tokens=2, temperature=-1.0)
    settle(srv.app)

    text = scrape(srv.app).text
    promtool_check_metrics(text)

    target = f"127.0.0.1:{srv.app.metrics_port}"
    with running_prometheus(target) as prom:
        prom.wait_for_value('adapterserve_requests_total{adapter="prom-lora",status="OK"}', 3)
        assert prom.query_value('adapterserve_requests_total{adapter="prom-lora",status="INVALID_ARGUMENT"}') == 1
        assert prom.query_value('adapterserve_generation_tokens_total{adapter="prom-lora"}') == 2 + 3 + 4
        assert prom.query_value('adapterserve_prompt_tokens_total{adapter="prom-lora"}') == 4 * 4
        assert prom.query_value('adapterserve_requests_total{adapter="_base",status="OK"}') == 1
        assert prom.query_value('adapterserve_request_duration_seconds_count{adapter="prom-lora"}') == 3
        assert prom.query_value('adapterserve_adapters_registered{type="lora"}') == 1
        assert prom.query_value(f'adapterserve_build_info{{model="{srv.app.model.name}",device="cpu"}}') == 1
        assert prom.query_value('up{job="adapterserve"}') == 1
        assert prom.query_value("process_cpu_seconds_total") > 0


def test_metrics_port_zero_disables_and_logging_flags(start_server, tiny_llama):
    srv = start_server(tiny_llama)  # the shared fixture passes --metrics-port 0
    assert srv.app.cfg.metrics_port == 0
    assert srv.app.metrics_port is None and srv.app.metrics.http_port is None
    assert srv.generate(token_ids=ids(3), max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    counted = srv.app.metrics.registry.get_sample_value("adapterserve_requests_total", {"adapter": "_base", "status": OK})
    assert counted == 1  # still recorded, just not served

    cfg = parse_config(["--metrics-port", "0", "--log-format", "json", "--log-level", "DEBUG",
                        "--metrics-max-adapter-labels", "7"], env={})
    assert (cfg.metrics_port, cfg.log_format, cfg.log_level, cfg.metrics_max_adapter_labels) == (0, "json", "DEBUG", 7)
    defaults = parse_config([], env={})
    assert (defaults.metrics_port, defaults.log_format, defaults.metrics_max_adapter_labels) == (9464, "text", 100)
    with pytest.raises(SystemExit):
        parse_config(["--log-format", "xml"], env={})
