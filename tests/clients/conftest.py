"""Fixtures for the client, CLI and access-control tests.

Every test that takes ``served`` talks to a server through its :class:`Served` description
only, so the same tests run against the in-process fake (default) or any other server:

* override the ``served`` fixture (e.g. in a conftest next to a real-server fixture)
  returning a :class:`Served`; tests needing the fake's instrumentation take ``fake``
  and skip themselves elsewhere;
* or point them at a running server with ``ADAPTERSERVE_TEST_TARGET=host:port`` plus
  ``ADAPTERSERVE_TEST_TOKEN``, ``ADAPTERSERVE_TEST_ADMIN_TOKEN`` (both optional) and
  ``ADAPTERSERVE_TEST_ADAPTER_DIR`` (a PEFT LoRA folder that server accepts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from server.config import ServerConfig
from tests.clients.fake_server import FakeServer

REPO = Path(__file__).resolve().parents[2]
AUTH_TOKEN = "user-token-1234"
ADMIN_TOKEN = "admin-token-5678"


@dataclass
class Served:
    """How to reach a server under test."""

    target: str
    token: str = ""          # plain bearer token; "" when the server has no --auth-token
    admin_token: str = ""    # "" when the server has no --admin-token
    adapter_dir: Path | None = None  # a PEFT LoRA folder the server accepts
    fake: FakeServer | None = None   # set when it is the in-process fake

    @property
    def writer_token(self) -> str | None:
        """The token that may register adapters."""
        return self.admin_token or self.token or None


def write_lora_dir(folder: Path, r: int = 4, hidden: int = 64, base_model: str = "fake-model") -> Path:
    """A small PEFT-shaped LoRA folder (config + safetensors) for the fake server."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {}
    for name in ("q_proj", "v_proj"):
        prefix = f"base_model.model.model.layers.0.self_attn.{name}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.zeros((hidden, r), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    """The server the shared tests talk to (the auth-enabled fake unless configured otherwise)."""
    target = os.environ.get("ADAPTERSERVE_TEST_TARGET")
    if target:
        adapter_dir = os.environ.get("ADAPTERSERVE_TEST_ADAPTER_DIR")
        yield Served(target, os.environ.get("ADAPTERSERVE_TEST_TOKEN", ""),
                     os.environ.get("ADAPTERSERVE_TEST_ADMIN_TOKEN", ""),
                     Path(adapter_dir) if adapter_dir else None)
        return
    fake = FakeServer(ServerConfig(auth_token=AUTH_TOKEN, admin_token=ADMIN_TOKEN)).start()
    try:
        yield Served(fake.target, AUTH_TOKEN, ADMIN_TOKEN,
                     write_lora_dir(tmp_path_factory.mktemp("lora")), fake)
    finally:
        fake.stop()


@pytest.fixture
def fake(served) -> FakeServer:
    """The fake server behind ``served``; skips the test against any other server."""
    if served.fake is None:
        pytest.skip("needs the in-process fake server's instrumentation")
    served.fake.fail_next.clear()
    return served.fake


@pytest.fixture
def adapter_dir(served) -> Path:
    """A PEFT adapter folder the served server accepts."""
    if served.adapter_dir is None:
        pytest.skip("no adapter folder for this server (ADAPTERSERVE_TEST_ADAPTER_DIR)")
    return served.adapter_dir


@pytest.fixture
def needs_auth(served) -> None:
    """Skip unless the server enforces --auth-token and --admin-token."""
    if not (served.token and served.admin_token):
        pytest.skip("server without --auth-token/--admin-token")


def run_cli(*args: str, token: str | None = None, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``python -m clients.cli ARGS`` as a user would; ADAPTERSERVE_* from the caller are dropped."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
    if token:
        clean["ADAPTERSERVE_TOKEN"] = token
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=REPO, env=clean, input=input,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Certs:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    """Certificates made with the openssl CLI (EC P-256, valid one day)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
                 "-subj", f"/CN=adapterserve test {ca}", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "other-ca.pem")
