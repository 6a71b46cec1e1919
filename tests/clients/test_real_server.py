"""The adapterserve CLI and Python client against the real server (tiny model, auth on)."""

from __future__ import annotations

import json

import pytest

from bench.server_process import free_port
from clients import AdapterServeClient, NotFoundError, PermissionDeniedError, UnauthenticatedError
from tests.clients.conftest import run_cli
from tests.peft_reference import make_peft_adapter, peft_greedy_reference

TOKEN, ADMIN = "real-user-token", "real-admin-token"


@pytest.fixture
def real(start_server, tiny_llama, tmp_path):
    adapter = make_peft_adapter(tiny_llama, tmp_path / "lora", "lora", seed=5)
    srv = start_server(tiny_llama, auth_token=TOKEN, admin_token=ADMIN, metrics_port=free_port())
    return srv, adapter


def test_cli_round_trip_with_auth(real, tiny_llama):
    srv, adapter = real
    target = ["--target", srv.app.target]
    assert run_cli("health", *target).returncode == 0  # health needs no token
    denied = run_cli("generate", "hello world", *target)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    plain = run_cli("adapters", "register", "tuned", "--local-dir", str(adapter), *target, token=TOKEN)
    assert plain.returncode == 1 and "PERMISSION_DENIED" in plain.stderr
    ok = run_cli("adapters", "register", "tuned", "--local-dir", str(adapter), *target, token=ADMIN)
    assert ok.returncode == 0, ok.stderr
    listing = run_cli("adapters", "list", *target, token=TOKEN)
    assert "tuned" in listing.stdout and "lora" in listing.stdout and "resident" in listing.stdout
    out = run_cli("generate", "hello world", "--adapter", "tuned", "--max-new-tokens", "6", "--json", *target,
                  token=TOKEN)
    result = json.loads(out.stdout)
    ids = srv.app.model.tokenizer.encode("hello world")
    assert result["token_ids"] == peft_greedy_reference(tiny_llama, adapter, ids, 6)[0][: len(result["token_ids"])]
    assert run_cli("info", *target, token=TOKEN).returncode == 0
    metrics = run_cli("metrics", "--metrics-url", f"http://127.0.0.1:{srv.app.metrics_port}/metrics", *target)
    assert metrics.returncode == 0 and "tuned" in metrics.stdout


def test_python_client_against_the_real_server(real):
    srv, adapter = real
    with AdapterServeClient(srv.app.target, token=ADMIN) as client:
        client.register_adapter("a1", local_dir=adapter)
        res = client.generate("the quick brown fox", adapter="a1", max_new_tokens=5, ignore_eos=True, logprobs=True)
        assert res.completion_tokens == 5 and len(res.logprobs) == 5 and res.finish_reason == "length"
        chunks = list(client.stream("the quick brown fox", adapter="a1", max_new_tokens=5, ignore_eos=True))
        assert "".join(c.text for c in chunks) == res.text and chunks[-1].finish_reason == "length"
        assert [a.adapter_id for a in client.list_adapters()] == ["a1"]
        with pytest.raises(NotFoundError):
            client.generate("x", adapter="missing", max_new_tokens=2)
    with AdapterServeClient(srv.app.target, token=TOKEN) as client, pytest.raises(PermissionDeniedError):
        client.unregister_adapter("a1")
    with AdapterServeClient(srv.app.target) as client, pytest.raises(UnauthenticatedError):
        client.list_adapters()
