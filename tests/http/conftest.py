"""A real server with HTTP on (tiny random Llama, adapters of every kind saved by PEFT) and openai clients."""

from __future__ import annotations

import socket

import openai
import pytest

from tests.clients.conftest import certs  # noqa: F401  (the openssl-made certificates, for the TLS test)
from tests.peft_reference import make_peft_adapter

KINDS = ["lora", "prompt", "ptuning", "prefix"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def http_adapter_root(tmp_path_factory, tiny_model_factory):
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("http-adapters")
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / kind, kind, seed=10 + i)
    return root


@pytest.fixture
def start_http(start_server, tiny_llama, http_adapter_root):
    """start_http(**config) -> tests.serving.Running with HTTP on a free port (.app.http_port)."""

    def start(**overrides):
        for attempt in range(3):  # a free port can be taken by another process before we bind it
            cfg = {"adapter_root": str(http_adapter_root), "kv_cache_tokens": 4096, "max_batch_size": 16,
                   "http_port": free_port(), **overrides}
            try:
                return start_server(tiny_llama, **cfg)
            except RuntimeError as e:
                if "cannot listen" not in str(e) or attempt == 2:
                    raise

    return start


@pytest.fixture
def http(start_http):
    return start_http()


def base_url(running) -> str:
    return f"http://127.0.0.1:{running.app.http_port}/v1"


def client(running, api_key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(running), api_key=api_key, max_retries=0, timeout=60, **kw)


def async_client(running, api_key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(running), api_key=api_key, max_retries=0, timeout=60)
