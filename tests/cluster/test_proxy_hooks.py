"""server.cluster.proxy_hooks without a Ray cluster: calls without ``application`` metadata go to the
ingress application, calls naming one keep it, and a lost replica is UNAVAILABLE."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from server.cluster import proxy_hooks, rpc


class FakeContext:
    def __init__(self, metadata):
        self.metadata = tuple(metadata)
        self.code = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code


class FakeServer:
    """Serve's gRPCGenericServer as the hook sees it: a factory of per-method handlers."""

    def __init__(self):
        self.seen: list[tuple] = []

        def factory(*, service_method, streaming_type):
            if streaming_type == "stream":
                async def stream(request, context):
                    self.seen.append(tuple(context.invocation_metadata()))
                    context.set_code(grpc.StatusCode.OK)  # reaches the call's own context
                    yield request
                return stream

            async def unary(request, context):
                self.seen.append(tuple(context.invocation_metadata()))
                return request
            return unary

        self.service_handler_factory = factory


def test_calls_without_application_go_to_the_default_application():
    server = FakeServer()
    assert proxy_hooks.default_application(server, "ingress-app")
    unary = server.service_handler_factory(service_method="/s/Generate", streaming_type="unary")
    stream = server.service_handler_factory(service_method="/s/GenerateStream", streaming_type="stream")

    async def go():
        assert await unary(b"x", FakeContext([("authorization", "Bearer t")])) == b"x"
        assert await unary(b"x", FakeContext([("application", "ingress-app-engine")])) == b"x"
        context = FakeContext([])
        assert [m async for m in stream(b"y", context)] == [b"y"]
        return context

    context = asyncio.run(go())
    assert server.seen == [(("authorization", "Bearer t"), ("application", "ingress-app")),
                           (("application", "ingress-app-engine"),),  # named: kept as sent
                           (("application", "ingress-app"),)]
    assert context.code == grpc.StatusCode.OK


def test_a_server_without_the_factory_is_left_alone():
    assert not proxy_hooks.default_application(object(), "app")


def test_a_lost_replica_is_unavailable(monkeypatch):
    from ray.exceptions import RayActorError
    from ray.serve._private import proxy

    monkeypatch.setattr(proxy, "get_grpc_response_status", proxy.get_grpc_response_status)  # restored after
    assert proxy_hooks.replica_loss_is_unavailable()
    assert proxy_hooks.replica_loss_is_unavailable()  # installed once
    status = proxy.get_grpc_response_status(RayActorError(), None, "req-1")
    assert status.code == grpc.StatusCode.UNAVAILABLE and "replica unavailable" in status.message
    assert proxy.get_grpc_response_status(TimeoutError(), 5.0, "req-2").code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_servicer_function_names_the_default_application():
    from ray._common.utils import import_attr

    assert rpc.servicer_function("adapterserve") == "server.cluster.rpc.add_services"
    hook = import_attr(rpc.servicer_function("team-a"))
    assert hook.keywords == {"default_app": "team-a"}
    with pytest.raises(AttributeError):
        rpc.add_services_for_app_  # noqa: B018 (a name that is no hook)
