"""TLS and mutual TLS round trips with certificates made in the test (openssl CLI)."""

from __future__ import annotations

import pytest

from clients import AdapterServeClient, UnauthenticatedError, UnavailableError
from server.config import ServerConfig
from tests.clients.conftest import run_cli
from tests.clients.fake_server import FakeServer


@pytest.fixture(scope="module")
def tls_server(certs):
    cfg = ServerConfig(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), auth_token="tls-token")
    with FakeServer(cfg, host="localhost") as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(certs):
    cfg = ServerConfig(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                       tls_client_ca=str(certs.ca))
    with FakeServer(cfg, host="127.0.0.1") as server:
        yield server


def test_tls_round_trip(tls_server, certs):
    with AdapterServeClient(tls_server.target, token="tls-token", tls_ca=certs.ca) as c:
        assert c.generate("over tls").text == "base: over tls"
        assert [ch.text for ch in c.stream("tls")][0] == "base"
    with AdapterServeClient(tls_server.target, tls_ca=certs.ca.read_bytes(), retries=0) as c:
        with pytest.raises(UnauthenticatedError):  # TLS does not replace the token
            c.list_adapters()


@pytest.mark.parametrize("kind", ["plaintext", "wrong-ca"])
def test_tls_refuses_untrusted_clients(tls_server, certs, kind):
    kw = {} if kind == "plaintext" else {"tls_ca": certs.other_ca}
    with AdapterServeClient(tls_server.target, token="tls-token", retries=0, timeout=5, **kw) as c:
        with pytest.raises(UnavailableError):
            c.health()


def test_mutual_tls(mtls_server, certs):
    with AdapterServeClient(mtls_server.target, tls_ca=certs.ca, tls_cert=certs.client_cert,
                            tls_key=certs.client_key) as c:
        assert c.health() == "SERVING"
        assert c.generate("mtls").text == "base: mtls"
    with AdapterServeClient(mtls_server.target, tls_ca=certs.ca, retries=0, timeout=5) as c:
        with pytest.raises(UnavailableError):  # no client certificate
            c.generate("mtls")


def test_cli_over_tls(tls_server, mtls_server, certs):
    out = run_cli("--target", tls_server.target, "--tls-ca", str(certs.ca), "generate", "cli tls",
                  token="tls-token")
    assert out.returncode == 0 and out.stdout == "base: cli tls\n", out.stderr
    env = {"ADAPTERSERVE_TLS_CA": str(certs.ca), "ADAPTERSERVE_CLIENT_CERT": str(certs.client_cert),
           "ADAPTERSERVE_CLIENT_KEY": str(certs.client_key)}
    out = run_cli("--target", mtls_server.target, "health", env=env)
    assert (out.returncode, out.stdout) == (0, "SERVING\n"), out.stderr
