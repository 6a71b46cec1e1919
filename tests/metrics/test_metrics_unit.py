"""ServerMetrics, request logging and the Grafana dashboard, driven directly (no engine, no gRPC).

The numbers must be true: each test records a known load and asserts exact counter deltas and
histogram counts; a real Prometheus (Debian package ``prometheus``) scrapes the endpoint and its
query API must return the recorded values.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import urllib.error
from pathlib import Path

import pytest

from server.metrics import ADAPTER_TYPES, ServerMetrics
from server.request_log import configure_logging, log_request
from tests.metrics import prometheus_harness as harness
from tests.metrics.prometheus_harness import http_get, promtool_check_metrics, running_prometheus

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"

EXPECTED_FAMILIES = {
    "adapterserve_requests_total",
    "adapterserve_api_requests_total",
    "adapterserve_api_time_to_first_token_seconds",
    "adapterserve_request_duration_seconds",
    "adapterserve_time_to_first_token_seconds",
    "adapterserve_time_per_output_token_seconds",
    "adapterserve_queue_wait_seconds",
    "adapterserve_prompt_tokens_total",
    "adapterserve_generation_tokens_total",
    "adapterserve_running_requests",
    "adapterserve_waiting_requests",
    "adapterserve_batch_size",
    "adapterserve_step_duration_seconds",
    "adapterserve_kv_cache_usage_ratio",
    "adapterserve_preemptions_total",
    "adapterserve_prefix_cache_tokens_total",
    "adapterserve_prefix_cache_pages",
    "adapterserve_adapters_registered",
    "adapterserve_adapters_resident",
    "adapterserve_adapter_loads_total",
    "adapterserve_adapter_load_seconds",
    "adapterserve_adapter_evictions_total",
    "adapterserve_adapter_cache_hits_total",
    "adapterserve_adapter_cache_misses_total",
    "adapterserve_merged_adapter_info",
    "adapterserve_build_info",
}

# (adapter_id, prompt_tokens, completion_tokens, total_s, ttft_s, tpot_s) of successful requests.
OK_LOAD = [
    ("a1", 10, 5, 0.30, 0.040, 0.020),
    ("a1", 12, 7, 0.60, 0.060, 0.030),
    ("a1", 8, 3, 3.00, 0.200, 0.800),
    ("a2", 20, 10, 1.50, 0.100, 0.050),
    ("a2", 4, 1, 0.02, 0.010, None),  # one generated token: no inter-token time
    ("", 6, 2, 0.20, 0.030, 0.010),  # base model
]
# One failing request of each kind the API produces: (adapter_id, status, prompt, completion, total_s, ttft_s).
FAILED_LOAD = [
    ("a1", "INVALID_ARGUMENT", 0, 0, 0.001, None),  # rejected by validation, never reached the engine
    ("nope", "NOT_FOUND", 0, 0, 0.001, None),  # unknown adapter
    ("a2", "DEADLINE_EXCEEDED", 9, 4, 2.00, 0.150),  # partial output before the deadline
    ("a1", "CANCELLED", 7, 2, 0.40, 0.050),  # client cancelled mid-stream
]


def value(m: ServerMetrics, name: str, **labels: str) -> float:
    """Sample value, 0.0 when the series does not exist."""
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def drive_known_load(m: ServerMetrics) -> None:
    for adapter, prompt, completion, total, ttft, tpot in OK_LOAD:
        m.request_finished(adapter, "OK", prompt, completion, total, ttft, tpot)
    for adapter, status, prompt, completion, total, ttft in FAILED_LOAD:
        m.request_finished(adapter, status, prompt, completion, total, ttft_s=ttft)
    for wait in (0.0005, 0.002, 0.02, 0.3, 4.0):
        m.observe_queue_wait(wait)
    m.observe_step("prefill", 3, 0.08)
    m.observe_step("decode", 3, 0.012)
    m.observe_step("decode", 5, 0.015)
    m.observe_step("decode", 40, 0.03)
    m.set_queue_depth(running=3, waiting=2)
    m.set_kv_usage(0.25)
    m.preempted()
    m.prefix_cache_lookup("a", hits=32, misses=5)
    m.prefix_cache_lookup("", hits=0, misses=7)
    m.set_prefix_cache_pages(12)
    m.set_adapter_counts({"lora": 3, "prefix_tuning": 1}, {"lora": 2})
    m.adapter_loaded("lora", True, 0.2)
    m.adapter_loaded("LORA", True, 0.3)
    m.adapter_loaded("prompt_tuning", False, 0.01)
    m.adapter_evicted()
    for hit in (True, True, True, False):
        m.adapter_cache(hit)
    m.set_merged_adapter("a1")


def exposition_names(m: ServerMetrics) -> set[str]:
    """Every sample name the registry can expose, with or without observations yet."""
    suffixes = {
        "counter": ["_total", "_created"],
        "gauge": [""],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "summary": ["", "_count", "_sum", "_created"],
        "info": ["_info"],
        "untyped": [""],
    }
    names: set[str] = set()
    for family in m.registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
        names.update(s.name for s in family.samples)
    return names


@pytest.fixture
def metrics():
    m = ServerMetrics(
        max_adapter_labels=10,
        build_info={"version": "9.9.9", "model": "tiny", "device": "cpu", "dtype": "float32"},
    )
    yield m
    m.stop_http()


# ------------------------------------------------------------------------------------------ values
def test_known_load_gives_exact_request_counters_and_histograms(metrics):
    drive_known_load(metrics)
    m = metrics
    assert value(m, "adapterserve_requests_total", adapter="a1", status="OK") == 3
    assert value(m, "adapterserve_requests_total", adapter="a2", status="OK") == 2
    assert value(m, "adapterserve_requests_total", adapter="_base", status="OK") == 1
    assert value(m, "adapterserve_requests_total", adapter="a1", status="INVALID_ARGUMENT") == 1
    assert value(m, "adapterserve_requests_total", adapter="nope", status="NOT_FOUND") == 1
    assert value(m, "adapterserve_requests_total", adapter="a2", status="DEADLINE_EXCEEDED") == 1
    assert value(m, "adapterserve_requests_total", adapter="a1", status="CANCELLED") == 1
    total = sum(
        s.value
        for f in m.registry.collect()
        if f.name == "adapterserve_requests"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert total == len(OK_LOAD) + len(FAILED_LOAD)

    # tokens: every request counts, partial output of failed ones included
    assert value(m, "adapterserve_prompt_tokens_total", adapter="a1") == 10 + 12 + 8 + 0 + 7
    assert value(m, "adapterserve_generation_tokens_total", adapter="a1") == 5 + 7 + 3 + 0 + 2
    assert value(m, "adapterserve_prompt_tokens_total", adapter="a2") == 20 + 4 + 9
    assert value(m, "adapterserve_generation_tokens_total", adapter="a2") == 10 + 1 + 4
    assert value(m, "adapterserve_prompt_tokens_total", adapter="_base") == 6
    assert value(m, "adapterserve_generation_tokens_total", adapter="nope") == 0

    # duration: OK requests only
    assert value(m, "adapterserve_request_duration_seconds_count", adapter="a1") == 3
    assert value(m, "adapterserve_request_duration_seconds_sum", adapter="a1") == pytest.approx(3.9)
    assert value(m, "adapterserve_request_duration_seconds_bucket", adapter="a1", le="0.5") == 1
    assert value(m, "adapterserve_request_duration_seconds_bucket", adapter="a1", le="1.0") == 2
    assert value(m, "adapterserve_request_duration_seconds_bucket", adapter="a1", le="+Inf") == 3
    assert value(m, "adapterserve_request_duration_seconds_count", adapter="a2") == 2
    assert value(m, "adapterserve_request_duration_seconds_count", adapter="nope") == 0
    # TTFT whenever given (a1: 3 OK + cancelled; a2: 2 OK + deadline), TPOT whenever given
    assert value(m, "adapterserve_time_to_first_token_seconds_count", adapter="a1") == 4
    assert value(m, "adapterserve_time_to_first_token_seconds_count", adapter="a2") == 3
    assert value(m, "adapterserve_time_to_first_token_seconds_bucket", adapter="a1", le="0.05") == 2
    assert value(m, "adapterserve_time_per_output_token_seconds_count", adapter="a1") == 3
    assert value(m, "adapterserve_time_per_output_token_seconds_count", adapter="a2") == 1
    assert value(m, "adapterserve_time_per_output_token_seconds_bucket", adapter="a1", le="0.025") == 1
    assert value(m, "adapterserve_time_per_output_token_seconds_sum", adapter="a1") == pytest.approx(0.85)

    assert value(m, "adapterserve_queue_wait_seconds_count") == 5
    assert value(m, "adapterserve_queue_wait_seconds_bucket", le="0.001") == 1
    assert value(m, "adapterserve_queue_wait_seconds_bucket", le="0.025") == 3
    assert value(m, "adapterserve_queue_wait_seconds_bucket", le="5.0") == 5


def test_engine_and_adapter_families(metrics):
    drive_known_load(metrics)
    m = metrics
    assert value(m, "adapterserve_step_duration_seconds_count", phase="prefill") == 1
    assert value(m, "adapterserve_step_duration_seconds_count", phase="decode") == 3
    assert value(m, "adapterserve_batch_size_count") == 4
    assert value(m, "adapterserve_batch_size_sum") == 3 + 3 + 5 + 40
    assert value(m, "adapterserve_batch_size_bucket", le="4.0") == 2
    assert value(m, "adapterserve_batch_size_bucket", le="8.0") == 3
    assert value(m, "adapterserve_batch_size_bucket", le="32.0") == 3
    assert value(m, "adapterserve_batch_size_bucket", le="64.0") == 4
    assert value(m, "adapterserve_running_requests") == 3
    assert value(m, "adapterserve_waiting_requests") == 2
    assert value(m, "adapterserve_kv_cache_usage_ratio") == 0.25
    assert value(m, "adapterserve_preemptions_total") == 1
    assert value(m, "adapterserve_prefix_cache_tokens_total", adapter="a", result="hit") == 32
    assert value(m, "adapterserve_prefix_cache_tokens_total", adapter="a", result="miss") == 5
    assert value(m, "adapterserve_prefix_cache_tokens_total", adapter="_base", result="miss") == 7
    assert value(m, "adapterserve_prefix_cache_pages") == 12

    assert {t: value(m, "adapterserve_adapters_registered", type=t) for t in ADAPTER_TYPES} == {
        "lora": 3,
        "prompt_tuning": 0,
        "p_tuning": 0,
        "prefix_tuning": 1,
        "dora": 0,
        "ia3": 0,
        "ln_tuning": 0,
        "bottleneck": 0,
    }
    assert {t: value(m, "adapterserve_adapters_resident", type=t) for t in ADAPTER_TYPES} == {
        "lora": 2,
        "prompt_tuning": 0,
        "p_tuning": 0,
        "prefix_tuning": 0,
        "dora": 0,
        "ia3": 0,
        "ln_tuning": 0,
        "bottleneck": 0,
    }
    m.set_adapter_counts({"lora": 1}, {})  # every type is set each time: prefix_tuning back to 0
    assert value(m, "adapterserve_adapters_registered", type="prefix_tuning") == 0
    assert value(m, "adapterserve_adapters_resident", type="lora") == 0

    assert value(m, "adapterserve_adapter_loads_total", type="lora", result="ok") == 2
    assert value(m, "adapterserve_adapter_loads_total", type="prompt_tuning", result="error") == 1
    assert value(m, "adapterserve_adapter_loads_total", type="prompt_tuning", result="ok") == 0
    assert value(m, "adapterserve_adapter_load_seconds_count", type="lora") == 2
    assert value(m, "adapterserve_adapter_load_seconds_sum", type="lora") == pytest.approx(0.5)
    assert value(m, "adapterserve_adapter_evictions_total") == 1
    assert value(m, "adapterserve_adapter_cache_hits_total") == 3
    assert value(m, "adapterserve_adapter_cache_misses_total") == 1

    assert value(m, "adapterserve_merged_adapter_info", adapter="a1") == 1
    m.set_merged_adapter("a2")
    assert m.registry.get_sample_value("adapterserve_merged_adapter_info", {"adapter": "a1"}) is None
    assert value(m, "adapterserve_merged_adapter_info", adapter="a2") == 1
    m.set_merged_adapter(None)
    merged = [
        s for f in m.registry.collect() if f.name == "adapterserve_merged_adapter_info" for s in f.samples
    ]
    assert merged == []


def test_family_names_build_info_and_process_collector(metrics):
    families = {f.name + ("_total" if f.type == "counter" else "") for f in metrics.registry.collect()}
    assert EXPECTED_FAMILIES <= families
    assert {f for f in families if f.startswith("adapterserve_")} == EXPECTED_FAMILIES
    assert "process_cpu_seconds_total" in families
    assert (
        value(
            metrics, "adapterserve_build_info", version="9.9.9", model="tiny", device="cpu", dtype="float32"
        )
        == 1
    )
    text = http_text(metrics)
    assert "# TYPE adapterserve_build_info gauge" in text
    assert "process_resident_memory_bytes" in text


def test_registries_are_independent():
    a, b = ServerMetrics(), ServerMetrics()
    a.request_finished("x", "OK", 1, 1, 0.1)
    assert (
        b.registry.get_sample_value("adapterserve_requests_total", {"adapter": "x", "status": "OK"}) is None
    )
    labels = _build_labels(a)
    assert labels["version"] and {k: labels[k] for k in ["model", "device", "dtype"]} == dict.fromkeys(
        ["model", "device", "dtype"], "unknown"
    )


def _build_labels(m: ServerMetrics) -> dict[str, str]:
    (sample,) = [s for f in m.registry.collect() if f.name == "adapterserve_build_info" for s in f.samples]
    return sample.labels


def test_invalid_label_values_are_refused(metrics):
    import grpc

    with pytest.raises(ValueError, match="gRPC code name"):
        metrics.request_finished("a", "BOGUS", 0, 0, 0.1)
    with pytest.raises(ValueError, match="phase"):
        metrics.observe_step("mixed", 1, 0.1)
    with pytest.raises(ValueError, match="adapter type"):
        metrics.adapter_loaded("adalora", True, 0.1)
    with pytest.raises(ValueError, match="adapter type"):
        metrics.set_adapter_counts({"boft": 1}, {})
    with pytest.raises(ValueError, match="build_info"):
        ServerMetrics(build_info={"commit": "x"})
    metrics.request_finished("a", grpc.StatusCode.RESOURCE_EXHAUSTED, 0, 0, 0.1)
    assert value(metrics, "adapterserve_requests_total", adapter="a", status="RESOURCE_EXHAUSTED") == 1


# ------------------------------------------------------------------------------------ cardinality
def test_adapter_label_cardinality_bound():
    m = ServerMetrics(max_adapter_labels=3)
    assert [m.adapter_label(x) for x in ["a", "b", "", "a", "c", "d", "e", "b", ""]] == [
        "a",
        "b",
        "_base",
        "a",
        "c",
        "_other",
        "_other",
        "b",
        "_base",
    ]
    for i in range(50):
        m.request_finished(f"ad{i}", "OK", 1, 2, 0.1)
    m.request_finished("c", "OK", 1, 2, 0.1)
    adapters = {
        s.labels["adapter"]
        for f in m.registry.collect()
        if f.name == "adapterserve_requests"
        for s in f.samples
    }
    assert adapters == {"c", "_other"}
    assert value(m, "adapterserve_requests_total", adapter="_other", status="OK") == 50
    assert value(m, "adapterserve_generation_tokens_total", adapter="_other") == 100
    assert ServerMetrics(max_adapter_labels=0).adapter_label("a") == "_other"


def test_adapter_label_is_thread_safe():
    m = ServerMetrics(max_adapter_labels=10)
    seen: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        out = [m.adapter_label(f"id{(k * 7 + i) % 40}") for i in range(200)]
        with lock:
            seen.extend(out)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    named = set(seen) - {"_other"}
    assert len(named) == 10 and "_other" in seen


# ------------------------------------------------------------------------------------------- http
def http_text(m: ServerMetrics, accept: str | None = None) -> str:
    port = m.http_port or m.start_http("127.0.0.1", 0)
    _, _, body = http_get(f"http://127.0.0.1:{port}/metrics", {"Accept": accept} if accept else None)
    return body.decode()


def test_http_text_by_default_openmetrics_on_request(metrics):
    drive_known_load(metrics)
    port = metrics.start_http("127.0.0.1", 0)
    assert port > 0 and metrics.http_port == port
    with pytest.raises(RuntimeError):
        metrics.start_http("127.0.0.1", 0)

    status, headers, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'adapterserve_requests_total{adapter="a1",status="OK"} 3.0' in text
    assert "# EOF" not in text

    for accept in [
        "application/openmetrics-text; version=1.0.0",
        # what Prometheus 2.x sends
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ]:
        _, headers, body = http_get(f"http://127.0.0.1:{port}/metrics", {"Accept": accept})
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        om = body.decode()
        assert om.endswith("# EOF\n")
        assert "# TYPE adapterserve_requests counter" in om
        assert 'adapterserve_requests_total{adapter="a1",status="OK"} 3.0' in om

    metrics.stop_http()
    assert metrics.http_port is None
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.stop_http()  # idempotent


def test_stop_http_frees_the_port(metrics):
    port = metrics.start_http("127.0.0.1", 0)
    metrics.stop_http()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_promtool_check_metrics_passes(metrics):
    drive_known_load(metrics)
    promtool_check_metrics(http_text(metrics))


# ------------------------------------------------------------------------------------- prometheus
def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_real_prometheus_scrapes_the_recorded_values(metrics):
    drive_known_load(metrics)
    port = metrics.start_http("127.0.0.1", 0)
    with running_prometheus(f"127.0.0.1:{port}") as prom:
        prom.wait_for_value('adapterserve_requests_total{adapter="a1",status="OK"}', 3, timeout=20)
        # later traffic shows up on the next scrape
        metrics.request_finished("a1", "OK", 1, 1, 0.1)
        prom.wait_for_value('adapterserve_requests_total{adapter="a1",status="OK"}', 4, timeout=20)
        assert prom.query_value('adapterserve_requests_total{adapter="nope",status="NOT_FOUND"}') == 1
        assert prom.query_value('adapterserve_generation_tokens_total{adapter="a2"}') == 15
        assert prom.query_value('adapterserve_request_duration_seconds_count{adapter="a1"}') == 4
        assert prom.query_value('adapterserve_batch_size_bucket{le="8.0"}') == 3
        assert prom.query_value('adapterserve_adapters_registered{type="lora"}') == 3
        assert prom.query_value('adapterserve_build_info{model="tiny",version="9.9.9"}') == 1
        assert prom.query_value('up{job="adapterserve"}') == 1
        assert prom.query_value("process_resident_memory_bytes") > 0
        # every dashboard expression is valid PromQL against the real server
        for expr in dashboard_exprs():
            prom.query(expr.replace("$__rate_interval", "1m").replace("$adapter", ".*"))
        process = prom.process
    assert process.poll() is not None, "Prometheus left running after the context exited"


def test_missing_binary_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(harness, "find_binary", lambda name: None)
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="prometheus binary not found"):
        harness.require_binary("prometheus")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install it"):
        harness.require_binary("prometheus")


# -------------------------------------------------------------------------------------- dashboard
def test_dashboard_is_valid_and_references_only_exposed_metrics(metrics):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    names = exposition_names(metrics)
    referenced = {n for e in exprs for n in re.findall(r"\b(?:adapterserve|process)_[a-z0-9_]+", e)}
    assert referenced - names == set(), (
        f"dashboard uses metrics the server does not expose: {referenced - names}"
    )
    # the must-have panels are all there
    for family in [
        "adapterserve_requests_total",
        "adapterserve_generation_tokens_total",
        "adapterserve_request_duration_seconds_bucket",
        "adapterserve_time_to_first_token_seconds_bucket",
        "adapterserve_time_per_output_token_seconds_bucket",
        "adapterserve_running_requests",
        "adapterserve_waiting_requests",
        "adapterserve_kv_cache_usage_ratio",
        "adapterserve_batch_size_bucket",
        "adapterserve_adapter_loads_total",
        "adapterserve_adapter_evictions_total",
        "adapterserve_adapter_cache_hits_total",
        "adapterserve_adapters_registered",
        "adapterserve_adapters_resident",
        "adapterserve_api_requests_total",
        "adapterserve_api_time_to_first_token_seconds_bucket",
    ]:
        assert family in referenced, family
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"


# ------------------------------------------------------------------------------------------- logs
@pytest.fixture
def log_stream():
    logger = logging.getLogger("adapterserve")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()
    yield stream
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved[0]:
        logger.addHandler(h)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_json_log_one_line_per_request(log_stream):
    configure_logging("json", "INFO", stream=log_stream)
    configure_logging("json", "INFO", stream=log_stream)  # reconfiguring must not duplicate lines
    log_request("r1", "a1", "OK", 10, 5, 1.25, 40.0, 300.0, finish_reason="length")
    log_request("r2", "", "INVALID_ARGUMENT", 0, 0, None, None, 0.8, error="max_new_tokens must be > 0")
    log_request("r3", "a2", "DEADLINE_EXCEEDED", 9, 4, 3.0, 150.0, 2000.0, name="clash")
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    first = records[0]
    assert {"ts", "level", "logger", "msg"} <= set(first)
    assert first["logger"] == "adapterserve.requests" and first["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert {
        k: first[k]
        for k in [
            "request_id",
            "adapter",
            "status",
            "prompt_tokens",
            "completion_tokens",
            "queue_ms",
            "ttft_ms",
            "total_ms",
            "finish_reason",
        ]
    } == {
        "request_id": "r1",
        "adapter": "a1",
        "status": "OK",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "queue_ms": 1.25,
        "ttft_ms": 40.0,
        "total_ms": 300.0,
        "finish_reason": "length",
    }
    assert records[1]["adapter"] == "_base" and records[1]["ttft_ms"] is None
    assert records[1]["error"] == "max_new_tokens must be > 0"
    assert records[2]["status"] == "DEADLINE_EXCEEDED" and records[2]["extra_name"] == "clash"


def test_text_log_and_level(log_stream):
    configure_logging("text", "WARNING", stream=log_stream)
    log_request("r1", "a1", "OK", 10, 5, 1.0, 40.0, 300.0)  # INFO: filtered out
    log_request("r2", "a1", "INTERNAL", 10, 0, 1.0, None, 5.0, error="boom here")
    (line,) = log_stream.getvalue().splitlines()
    assert " WARNING adapterserve.requests request finished " in line
    assert "request_id=r2" in line and "status=INTERNAL" in line and "ttft_ms=-" in line
    assert 'error="boom here"' in line
    with pytest.raises(ValueError):
        configure_logging("xml")


def test_api_label_is_bounded_and_counts_each_request_once(metrics):
    metrics.request_finished("a1", "OK", 3, 4, 0.5, ttft_s=0.1, api="http")
    metrics.request_finished("a1", "NOT_FOUND", 0, 0, 0.01)  # api defaults to grpc
    assert value(metrics, "adapterserve_api_requests_total", api="http", status="OK") == 1
    assert value(metrics, "adapterserve_api_requests_total", api="grpc", status="NOT_FOUND") == 1
    assert value(metrics, "adapterserve_api_time_to_first_token_seconds_count", api="http") == 1
    assert value(metrics, "adapterserve_requests_total", adapter="a1", status="OK") == 1
    with pytest.raises(ValueError, match="api must be one of"):
        metrics.request_finished("a1", "OK", 0, 0, 0.1, api="websocket")
