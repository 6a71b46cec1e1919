"""The scripts in clients/examples run against a server."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.clients.conftest import REPO


def _run(module: str, *args: str, token: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
    proc = subprocess.run([sys.executable, "-m", f"clients.examples.{module}", *args,
                           *(["--token", token] if token else [])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_register_then_multi_adapter_then_streaming(served, adapter_dir):
    out = _run("register_trained_adapter", str(adapter_dir), "Hello", "--id", "example-lora",
               "--target", served.target, token=served.writer_token)
    assert "registered example-lora: lora" in out and "--- (base):" in out and "--- example-lora:" in out
    out = _run("multi_adapter", "Hello", "--adapters", "example-lora,no-such-adapter", "-n", "4",
               "--target", served.target, token=served.token or None)
    assert "--- (base) [" in out and "--- example-lora [" in out and "--- no-such-adapter: NOT_FOUND" in out
    out = _run("streaming", "Hello", "--adapter", "example-lora", "-n", "4", "--target", served.target,
               token=served.token or None)
    assert "prompt +" in out and "generated tokens" in out
