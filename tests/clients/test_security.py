"""Access control: the interceptor's rules as a table, then every outcome over real RPCs."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from clients import (
    AdapterServeClient,
    AsyncAdapterServeClient,
    PermissionDeniedError,
    UnauthenticatedError,
)
from server.api.security import TokenAuthInterceptor, add_listen_port, bearer_token, server_interceptors
from server.config import ConfigError, ServerConfig

GEN = "/adapterserve.v1.GenerationService/Generate"
STREAM = "/adapterserve.v1.GenerationService/GenerateStream"
LIST = "/adapterserve.v1.AdapterService/ListAdapters"
REGISTER = "/adapterserve.v1.AdapterService/RegisterAdapter"
UNREGISTER = "/adapterserve.v1.AdapterService/UnregisterAdapter"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECT = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
OK, UNAUTH, DENIED = None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _md(token):
    return [] if token is None else [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize("auth,admin,method,token,expected", [
    # --auth-token and --admin-token
    ("u", "a", GEN, None, UNAUTH), ("u", "a", GEN, "x", UNAUTH), ("u", "a", GEN, "u", OK),
    ("u", "a", GEN, "a", OK), ("u", "a", STREAM, None, UNAUTH), ("u", "a", LIST, "u", OK),
    ("u", "a", REGISTER, None, UNAUTH), ("u", "a", REGISTER, "x", UNAUTH),
    ("u", "a", REGISTER, "u", DENIED), ("u", "a", REGISTER, "a", OK),
    ("u", "a", UNREGISTER, "u", DENIED), ("u", "a", UNREGISTER, "a", OK),
    ("u", "a", HEALTH, None, OK), ("u", "a", REFLECT, None, OK),
    # --auth-token only: one token for everything
    ("u", "", GEN, None, UNAUTH), ("u", "", REGISTER, "u", OK), ("u", "", REGISTER, "x", UNAUTH),
    # --admin-token only: generation open, mutations guarded
    ("", "a", GEN, None, OK), ("", "a", REGISTER, None, UNAUTH), ("", "a", REGISTER, "x", UNAUTH),
    ("", "a", REGISTER, "a", OK), ("", "a", LIST, None, OK),
])
def test_rules(auth, admin, method, token, expected):
    denial = TokenAuthInterceptor(auth, admin).check(method, _md(token))
    assert (denial and denial[0]) == expected


@pytest.mark.parametrize("metadata,token", [
    ([("authorization", "Bearer abc")], "abc"), ([("authorization", "bearer  abc ")], "abc"),
    ([("authorization", b"Bearer abc")], "abc"), ([("authorization", "Basic abc")], None),
    ([("authorization", "Bearer ")], None), ([("x-other", "Bearer abc")], None), ([], None), (None, None),
])
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


def test_messages_say_what_is_missing():
    interceptor = TokenAuthInterceptor("u", "a")
    assert "authorization: Bearer" in interceptor.check(GEN, [])[1]
    assert interceptor.check(GEN, _md("x"))[1] == "invalid token"
    assert interceptor.check(REGISTER, _md("u"))[1] == "RegisterAdapter requires the admin token"


def test_no_tokens_no_interceptor(tmp_path):
    assert server_interceptors(ServerConfig()) == []
    (tmp_path / "tok").write_text("from-file\n")
    (interceptor,) = server_interceptors(ServerConfig(auth_token_file=str(tmp_path / "tok")))
    assert interceptor.check(GEN, _md("from-file")) is None
    with pytest.raises(ConfigError, match="auth-token-file"):
        server_interceptors(ServerConfig(auth_token_file=str(tmp_path / "missing")))


def test_add_listen_port_errors(tmp_path):
    async def bind(cfg, address="127.0.0.1:0"):
        server = grpc.aio.server()
        try:
            return add_listen_port(server, address, cfg)
        finally:
            await server.stop(None)

    import asyncio

    assert asyncio.run(bind(ServerConfig())) > 0
    with pytest.raises(ConfigError, match="tls-cert"):
        asyncio.run(bind(ServerConfig(tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key"))))
    with pytest.raises(RuntimeError):
        asyncio.run(bind(ServerConfig(), "256.1.1.1:1"))


# ---------------------------------------------------------------- over the wire


def _client(served, token):
    return AdapterServeClient(served.target, token=token, timeout=10, retries=0)


@pytest.mark.usefixtures("needs_auth")
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_unauthenticated_everywhere(served, token):
    with _client(served, token) as c:
        for call in (lambda: c.generate("hi", max_new_tokens=2), lambda: list(c.stream("hi", max_new_tokens=2)),
                     c.list_adapters, lambda: c.get_adapter("x"), c.model_info,
                     lambda: c.unregister_adapter("x")):
            with pytest.raises(UnauthenticatedError):
                call()
        assert c.health() == "SERVING"  # health needs no token


@pytest.mark.usefixtures("needs_auth")
def test_plain_token_cannot_mutate(served, adapter_dir):
    with _client(served, served.token) as c:
        c.list_adapters()
        with pytest.raises(PermissionDeniedError, match="admin"):
            c.register_adapter("denied-adapter", local_dir=adapter_dir)
        with pytest.raises(PermissionDeniedError):
            c.unregister_adapter("denied-adapter")


@pytest.mark.usefixtures("needs_auth")
def test_admin_token_can_do_everything(served, adapter_dir):
    with _client(served, served.admin_token) as c:
        c.register_adapter("admin-adapter", local_dir=adapter_dir, replace=True)
        assert c.generate("hi", adapter="admin-adapter", max_new_tokens=2).completion_tokens <= 2
        assert c.unregister_adapter("admin-adapter") == "admin-adapter"


@pytest.mark.usefixtures("needs_auth")
def test_denied_calls_never_reach_the_servicer(fake, served):
    before = dict(fake.calls)
    with _client(served, None) as c, pytest.raises(UnauthenticatedError):
        c.list_adapters()
    with _client(served, served.token) as c, pytest.raises(PermissionDeniedError):
        c.unregister_adapter("x")
    assert dict(fake.calls) == before


@pytest.mark.usefixtures("needs_auth")
def test_async_client_auth(served):
    import asyncio

    async def go():
        async with AsyncAdapterServeClient(served.target, retries=0) as c:
            with pytest.raises(UnauthenticatedError):
                await c.model_info()
            with pytest.raises(UnauthenticatedError):
                async for _ in c.stream("hi"):
                    pass
            assert await c.health() == "SERVING"

    asyncio.run(go())


def test_reflection_needs_no_token(served):
    with grpc.insecure_channel(served.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "adapterserve.v1.GenerationService" in services
    assert "adapterserve.v1.AdapterService" in services
