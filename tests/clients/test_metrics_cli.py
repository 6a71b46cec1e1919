"""``adapterserve metrics``: the per-adapter table from a Prometheus exposition."""

from __future__ import annotations

import math
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, make_wsgi_app

from clients.cli import histogram_quantile, summarize_metrics
from tests.clients.conftest import run_cli

BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0)


def _registry() -> CollectorRegistry:
    """Known traffic: adapter a: 4 ok requests (0.05, 0.3, 0.3, 0.7 s), 40 tokens; a 1 error;
    _base: 2 requests of 3 s, 30 tokens."""
    reg = CollectorRegistry()
    requests = Counter("adapterserve_requests_total", "", ["adapter", "status"], registry=reg)
    tokens = Counter("adapterserve_generation_tokens_total", "", ["adapter"], registry=reg)
    duration = Histogram("adapterserve_request_duration_seconds", "", ["adapter"], buckets=BUCKETS, registry=reg)
    other = Counter("adapterserve_prompt_tokens_total", "", ["adapter"], registry=reg)
    for seconds in (0.05, 0.3, 0.3, 0.7):
        requests.labels("a", "OK").inc()
        duration.labels("a").observe(seconds)
    requests.labels("a", "NOT_FOUND").inc()
    tokens.labels("a").inc(40)
    for _ in range(2):
        requests.labels("_base", "OK").inc()
        duration.labels("_base").observe(3.0)
    tokens.labels("_base").inc(30)
    other.labels("a").inc(999)
    return reg


def test_histogram_quantile_matches_prometheus():
    buckets = {0.1: 1, 0.5: 3, 1.0: 4, math.inf: 4}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (2 - 1) / 2)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * (3.96 - 3) / 1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, {1.0: 1, math.inf: 5}) == 1.0  # in +Inf: largest finite bound
    assert histogram_quantile(0.5, {1.0: 0, math.inf: 0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_summarize_metrics():
    rows = {r.adapter: r for r in summarize_metrics(generate_latest(_registry()).decode())}
    assert list(rows) == ["a", "_base", "ALL"]
    a = rows["a"]
    assert (a.requests, a.errors, a.generation_tokens, a.duration_count) == (5, 1, 40, 4)
    assert a.tokens_per_second == pytest.approx(40 / 1.35)
    assert a.latency_quantile(0.5) == pytest.approx(0.1 + 0.4 * (2 - 1) / (3 - 1))
    assert a.latency_quantile(0.99) == pytest.approx(0.5 + 0.5 * (3.96 - 3) / (4 - 3))
    assert rows["_base"].latency_quantile(0.5) == pytest.approx(2.0 + 3.0 * 0.5)
    assert rows["ALL"].requests == 7 and rows["ALL"].tokens_per_second == pytest.approx(70 / 7.35)
    assert summarize_metrics("") == []


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_url():
    httpd = make_server("127.0.0.1", 0, make_wsgi_app(_registry()), handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/metrics"
    httpd.shutdown()
    httpd.server_close()


def test_metrics_command(metrics_url):
    out = run_cli("metrics", "--metrics-url", metrics_url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ADAPTER", "REQUESTS", "ERRORS", "GEN_TOKENS", "TOKENS/S", "P50_MS", "P99_MS"]
    assert lines[1].split() == ["a", "5", "1", "40", "29.6", "300", "980"]
    assert lines[2].split() == ["_base", "2", "0", "30", "5.0", "3500", "4970"]
    assert lines[3].split()[:4] == ["ALL", "7", "1", "70"]
    assert "summed request durations" in out.stdout
    assert lines[0].index("REQUESTS") + len("REQUESTS") == lines[1].index("5") + 1  # right-aligned numbers


def test_metrics_unreachable():
    out = run_cli("metrics", "--metrics-url", "http://127.0.0.1:1/metrics")
    assert out.returncode == 1 and "cannot fetch http://127.0.0.1:1/metrics" in out.stderr


def test_default_metrics_url():
    from clients.cli import _default_metrics_url

    assert _default_metrics_url("10.0.0.5:50051") == "http://10.0.0.5:9464/metrics"
    assert _default_metrics_url("[::1]:50051") == "http://[::1]:9464/metrics"
    assert _default_metrics_url("dns:///myhost:50051") == "http://myhost:9464/metrics"
    assert _default_metrics_url("localhost") == "http://localhost:9464/metrics"
