"""Run a real Prometheus server and ``promtool`` from tests (Debian package ``prometheus``).

- :func:`require_binary` finds ``prometheus`` / ``promtool``; when missing it fails under CI
  (``CI=true``) and skips, with the reason, elsewhere.
- :func:`running_prometheus` starts Prometheus on 127.0.0.1 with a temporary config (1 s scrape
  interval, one static target) and data dir, waits for ``/-/ready``, and always stops it. The
  process also gets ``PR_SET_PDEATHSIG`` so it dies with the test process even on ``kill -9``.
  Nothing it does needs the network beyond loopback.
- :class:`Prometheus` queries ``/api/v1/query`` with urllib and polls for a value.
- :func:`promtool_check_metrics` lints exposition text with ``promtool check metrics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DEBIAN_PATHS = {"prometheus": "/usr/bin/prometheus", "promtool": "/usr/bin/promtool"}
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"

# Loopback only: never route through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict, bytes]:
    """GET ``url`` without any proxy; return (status, headers, body)."""
    req = urllib.request.Request(url, headers=headers or {})
    with _OPENER.open(req, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def in_ci() -> bool:
    """True when the ``CI`` environment variable says we run under continuous integration."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_binary(name: str) -> str | None:
    """Return the path of ``name`` (``prometheus`` or ``promtool``) on PATH or in /usr/bin, else None."""
    found = shutil.which(name)
    if found:
        return found
    fallback = DEBIAN_PATHS.get(name)
    if fallback and os.access(fallback, os.X_OK):
        return fallback
    return None


def require_binary(name: str) -> str:
    """Return the path of ``name``; when missing, fail under CI and skip (reason shown by -ra) elsewhere."""
    path = find_binary(name)
    if path:
        return path
    reason = f"{name} binary not found (install the Debian package: {INSTALL_HINT})"
    if in_ci():
        pytest.fail(f"{reason}; CI must install it (.ci/run does)", pytrace=False)
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)
    raise AssertionError("unreachable")  # pragma: no cover


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def promtool_check_metrics(text: str, promtool: str | None = None) -> str:
    """Run ``promtool check metrics`` on exposition ``text``; return its output, raise AssertionError on problems."""
    promtool = promtool or require_binary("promtool")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or output:
        raise AssertionError(f"promtool check metrics failed (rc={proc.returncode}):\n{output}")
    return output


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class Prometheus:
    """A running Prometheus: its base URL, process, and folder (config, data, log)."""

    url: str
    process: subprocess.Popen
    workdir: Path

    def log(self) -> str:
        """Return Prometheus's own log output so far (for failure messages)."""
        try:
            return (self.workdir / "prometheus.log").read_text(errors="replace")
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> dict:
        """GET ``/api/v1/<path>`` with query ``params``; return the decoded ``data`` (raise on error)."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with _OPENER.open(url, timeout=5) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise AssertionError(f"Prometheus API {path} {params}: HTTP {e.code}: {body}") from e
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Run an instant query; return its ``result`` list (each item has ``metric`` and ``value``)."""
        return self.api("query", query=promql)["result"]

    def query_value(self, promql: str) -> float | None:
        """Run an instant query expected to return at most one series; return its value or None."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{promql!r} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def wait_for_value(self, promql: str, expected: float, timeout: float = 20.0) -> float:
        """Poll ``promql`` until its single value equals ``expected``; raise with the last value on timeout."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while True:
            last = self.query_value(promql)
            if last is not None and abs(last - expected) < 1e-9:
                return last
            if time.monotonic() >= deadline:
                targets = self.api("targets").get("activeTargets", [])
                raise AssertionError(
                    f"{promql!r} = {last}, expected {expected} after {timeout}s; "
                    f"targets: {targets}\nprometheus log:\n{self.log()[-2000:]}"
                )
            time.sleep(0.25)


def _write_config(workdir: Path, target: str, scrape_interval: str) -> Path:
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  scrape_timeout: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        "scrape_configs:\n"
        "  - job_name: adapterserve\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    return config


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_prometheus(
    target: str, scrape_interval: str = "1s", ready_timeout: float = 30.0, binary: str | None = None
) -> Iterator[Prometheus]:
    """Start Prometheus scraping ``target`` (``host:port``) on a free loopback port; stop it on exit.

    Call from the main thread: the child is tied to the calling thread's lifetime (PDEATHSIG).
    """
    binary = binary or require_binary("prometheus")
    with tempfile.TemporaryDirectory(prefix="adapterserve-prom-") as tmp:
        workdir = Path(tmp)
        config = _write_config(workdir, target, scrape_interval)
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind: retry
            port = free_port()
            cmd = [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
                "--storage.tsdb.retention.time=1h",
            ]
            log = open(workdir / "prometheus.log", "wb")
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            prom = Prometheus(url=f"http://127.0.0.1:{port}", process=proc, workdir=workdir)
            try:
                state = _wait_ready(prom, ready_timeout)
                if state == "ready":
                    yield prom
                    return
                last_error = f"({state})\n{prom.log()}"
            finally:
                _stop(proc)
                log.close()
            if state != "exited":  # only a lost port race is worth another try
                break
        raise AssertionError(f"Prometheus did not become ready: {' '.join(cmd)}\n{last_error[-3000:]}")


def _wait_ready(prom: Prometheus, timeout: float) -> str:
    """Poll ``/-/ready``: ``"ready"`` once it answers 200, ``"exited"`` or ``"timeout"`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prom.process.poll() is not None:
            return "exited"
        try:
            with _OPENER.open(f"{prom.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return "ready"
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    return "timeout"
