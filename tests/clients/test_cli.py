"""The ``adapterserve`` command line, driven as a user would: a subprocess against a running server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.clients.conftest import REPO, run_cli


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_console_script_help():
    script = Path(sys.executable).parent / "adapterserve"
    if not script.exists():
        script = shutil.which("adapterserve")
    if not script:
        pytest.skip("adapterserve console script not installed (pip install -e .)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0
    for command in ("generate", "chat", "adapters", "health", "info", "metrics", "--target", "--token"):
        assert command in out.stdout


def test_generate_streams_and_json(served):
    text = _ok(run_cli("--target", served.target, "generate", "Hello", "-n", "4", "--stats",
                       token=served.token))
    assert text.endswith("\n") and len(text) > 1
    result = json.loads(_ok(run_cli("generate", "Hello", "-n", "4", "--json", "--target", served.target,
                                    token=served.token)))
    assert text.rstrip("\n") == result["text"].rstrip("\n")  # streamed text == whole result
    assert result["finish_reason"] in ("length", "stop", "eos") and result["completion_tokens"] <= 4
    assert set(result) >= {"token_ids", "prompt_tokens", "logprobs", "timings", "adapter_id", "request_id"}


def test_generate_echo_and_flags(fake, served):
    env = {"ADAPTERSERVE_TARGET": served.target}
    assert _ok(run_cli("generate", "hello world", "--stop", "wor", token=served.token, env=env)) == "base: hello \n"
    out = run_cli("generate", "-", "--chat", "--system", "be nice", "-n", "6", token=served.token, env=env,
                  input="piped prompt")
    assert _ok(out) == "base: \n"
    out = run_cli("generate", "hey", "--top-logprobs", "1", token=served.token, env=env)
    assert "LOGPROB" in _ok(out) and "'y'" in out.stdout


def test_errors_exit_1_with_the_message(served):
    out = run_cli("--target", served.target, "generate", "Hi", "--adapter", "no-such-adapter", token=served.token)
    assert out.returncode == 1 and out.stderr.startswith("error: NOT_FOUND: ") and "no-such-adapter" in out.stderr
    out = run_cli("--target", "127.0.0.1:1", "health", "--timeout", "2")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr and "127.0.0.1:1" in out.stderr
    assert run_cli("generate").returncode in (1, 2)  # no prompt, no stdin
    assert run_cli("adapters", "register", "x").returncode == 2  # needs --path or --local-dir


@pytest.mark.usefixtures("needs_auth")
def test_token_flag_env_and_file(served, tmp_path):
    assert "UNAUTHENTICATED" in run_cli("--target", served.target, "info").stderr
    assert "UNAUTHENTICATED" in run_cli("--target", served.target, "info", "--token", "nope").stderr
    _ok(run_cli("--target", served.target, "info", "--token", served.token))
    (tmp_path / "tok").write_text(served.token + "\n")
    _ok(run_cli("--target", served.target, "info", "--token-file", str(tmp_path / "tok")))
    _ok(run_cli("--target", served.target, "health"))  # no token needed


def test_adapters_commands(served, adapter_dir):
    adapter_id = f"cli-{uuid.uuid4().hex[:6]}"
    env = {"ADAPTERSERVE_TARGET": served.target}
    if served.admin_token:
        denied = run_cli("adapters", "register", adapter_id, "--local-dir", str(adapter_dir), token=served.token, env=env)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    out = _ok(run_cli("adapters", "register", adapter_id, "--local-dir", str(adapter_dir), "--pin",
                      token=served.writer_token, env=env))
    assert f"registered {adapter_id}" in out and "pinned:" in out
    table = _ok(run_cli("adapters", "list", token=served.token, env=env)).splitlines()
    assert table[0].split()[:5] == ["ID", "TYPE", "RANK", "VTOKENS", "STATE"]
    row = next(line for line in table if line.startswith(adapter_id + " "))
    assert table[0].index("TYPE") == row.index("lora")  # columns aligned
    shown = json.loads(_ok(run_cli("adapters", "show", adapter_id, "--json", token=served.token, env=env)))
    assert shown["adapter_id"] == adapter_id and shown["pinned"] is True
    assert "type:" in _ok(run_cli("adapters", "show", adapter_id, token=served.token, env=env))
    assert _ok(run_cli("adapters", "unregister", adapter_id, token=served.writer_token, env=env)) == \
        f"unregistered {adapter_id}\n"
    gone = run_cli("adapters", "show", adapter_id, token=served.token, env=env)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_health_and_info(served):
    assert _ok(run_cli("health", "--target", served.target)) == "SERVING\n"
    info = _ok(run_cli("info", "--target", served.target, token=served.token))
    assert "architecture:" in info and "limit: max batch size:" in info and "kernels: matmul:" in info
    assert json.loads(_ok(run_cli("info", "--json", "--target", served.target, token=served.token)))["vocab_size"] > 0


def test_chat_keeps_history_and_switches_adapter(fake, served, adapter_dir):
    from clients import AdapterServeClient

    with AdapterServeClient(served.target, token=served.writer_token) as c:
        c.register_adapter("chat-a", local_dir=adapter_dir, replace=True)
    script = "hi\n/adapter chat-a\nhow are you\n/adapter nope\n/adapter -\nbye\n/history\n/exit\nnever sent\n"
    out = run_cli("chat", "--target", served.target, "--system", "be brief", token=served.token, input=script)
    lines = _ok(out).splitlines()
    assert lines[:5] == ["base: hi", "adapter: chat-a", "chat-a: how are you", "adapter: (base model)", "base: bye"]
    assert lines[5:] == ["system: be brief", "user: hi", "assistant: base: hi", "user: how are you",
                         "assistant: chat-a: how are you", "user: bye", "assistant: base: bye"]
    assert "not registered" in out.stderr  # /adapter nope
    assert fake.calls["GenerateStream"] >= 3


def test_chat_survives_errors(fake, served):
    out = run_cli("chat", "--target", served.target, token=served.token, input="__exhausted__\nok\n")
    assert _ok(out).splitlines() == ["base: ok"]
    assert "RESOURCE_EXHAUSTED" in out.stderr
