"""server.cluster.lease without Ray, on a real grpc.aio server: a replica's own port serves a
generation only under an open, unused lease for the request's adapter (one lease, one generation),
claims it when the handler starts and releases it however the call ends (answered, failed,
cancelled); refuses adapter admin; a lease no call claims ends after the claim time, every lease when
the replica closes; ids are unguessable."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from clients._common import LEASE_METADATA as CLIENT_LEASE_METADATA
from clients._common import replica_address_problem
from server.cluster.lease import LEASE_METADATA, Leases, ReplicaPortInterceptor


def test_the_clients_name_the_lease_as_the_replicas_read_it():
    assert CLIENT_LEASE_METADATA == LEASE_METADATA


def test_a_loopback_replica_address_is_only_for_a_client_on_a_loopback_target():
    assert replica_address_problem("127.0.0.1:4000", "127.0.0.1:50051") is None
    assert replica_address_problem("10.0.0.7:4000", "cluster.example:50051") is None
    assert "--replica-host 0.0.0.0" in replica_address_problem("127.0.0.1:4000", "cluster.example:50051")
    assert replica_address_problem("[::1]:4000", "dns:///10.0.0.2:50051")
    assert replica_address_problem("", "127.0.0.1:50051")  # a lease that named nothing
    for local in ("ipv4:127.0.0.1:50051", "dns:localhost:50051", "dns://8.8.8.8/localhost:50051",
                  "dns:///localhost:50051", "[::1]:50051", "ipv6:[::1]:50051"):  # gRPC's target forms
        assert replica_address_problem("127.0.0.1:4000", local) is None, local


async def _held(leases: Leases, lease_id: str, claim_s: float = 5.0) -> asyncio.Task:
    task = asyncio.create_task(leases.hold(lease_id, claim_s))
    await asyncio.sleep(0)
    return task


def test_a_lease_is_claimed_once_and_ends_when_its_generation_ends():
    async def main():
        leases = Leases(asyncio.Event())
        lease_id = leases.open("lora")
        assert len(lease_id) == 32 and leases.open() != lease_id  # 128 random bits each
        assert leases.adapter_of(lease_id) == "lora"
        task = await _held(leases, lease_id)
        assert leases.claim(lease_id)
        assert not leases.claim(lease_id) and leases.adapter_of(lease_id) is None  # one lease, one generation
        await asyncio.sleep(0.05)
        assert not task.done()  # claimed, still running
        leases.release(lease_id)
        await asyncio.wait_for(task, 1)
        leases.end(lease_id)
        assert not leases.claim(lease_id)  # an ended lease's id claims nothing

    asyncio.run(main())


def test_an_unclaimed_lease_ends_after_the_claim_time_and_every_lease_when_the_replica_closes():
    async def main():
        closed = asyncio.Event()
        leases = Leases(closed)
        unclaimed = await _held(leases, leases.open(), claim_s=0.05)
        await asyncio.wait_for(unclaimed, 1)
        claimed_id = leases.open()
        claimed = await _held(leases, claimed_id)
        leases.claim(claimed_id)
        waiting = await _held(leases, leases.open())
        closed.set()
        await asyncio.wait_for(asyncio.gather(claimed, waiting), 1)
        assert not leases.claim("0" * 32)  # a foreign id

    asyncio.run(main())


class _Servicer(pb_grpc.GenerationServiceServicer):
    """Generation stand-in: Generate answers (or fails on "fail"); GenerateStream sends until cancelled."""

    async def Generate(self, request, context):
        if request.prompt == "fail":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such adapter")
        return pb.GenerateResponse(text="ok")

    async def GenerateStream(self, request, context):
        for i in range(request.params.max_new_tokens or 10_000):
            yield pb.GenerateStreamResponse(text=str(i))
            await asyncio.sleep(0.01)


class _Admin(pb_grpc.AdapterServiceServicer):
    async def RegisterAdapter(self, request, context):
        return pb.Adapter(adapter_id=request.adapter_id)


async def _replica_port(leases: Leases, used: list[str]) -> tuple[grpc.aio.Server, int]:
    async def use_adapter(adapter_id: str) -> None:
        used.append(adapter_id)

    server = grpc.aio.server(interceptors=[ReplicaPortInterceptor(leases, use_adapter)])
    pb_grpc.add_GenerationServiceServicer_to_server(_Servicer(), server)
    pb_grpc.add_AdapterServiceServicer_to_server(_Admin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.parametrize("how", ["answered", "failed", "streamed", "cancelled"])
def test_the_replica_port_releases_the_lease_however_the_call_ends(how):
    async def main():
        leases, used = Leases(asyncio.Event()), []
        server, port = await _replica_port(leases, used)
        try:
            lease_id = leases.open("lora")
            held = await _held(leases, lease_id)
            md = ((LEASE_METADATA, lease_id),)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                if how == "answered":
                    assert (await stub.Generate(pb.GenerateRequest(prompt="x", adapter_id="lora"), metadata=md)).text == "ok"
                elif how == "failed":
                    with pytest.raises(grpc.RpcError) as err:
                        await stub.Generate(pb.GenerateRequest(prompt="fail", adapter_id="lora"), metadata=md)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                elif how == "streamed":
                    request = pb.GenerateRequest(adapter_id="lora", params=pb.SamplingParams(max_new_tokens=3))
                    assert [m.text async for m in stub.GenerateStream(request, metadata=md)] == ["0", "1", "2"]
                else:
                    call = stub.GenerateStream(pb.GenerateRequest(adapter_id="lora"), metadata=md)
                    await call.read()
                    await asyncio.sleep(0.05)
                    assert not held.done()  # the generation runs: the lease holds
                    call.cancel()
                await asyncio.wait_for(held, 5)
                assert used == ["lora"]  # made resident through the replica's multiplexer first
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_the_replica_port_refuses_what_no_open_lease_covers_and_adapter_admin():
    async def main():
        leases, used = Leases(asyncio.Event()), []
        server, port = await _replica_port(leases, used)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)

                async def code(request, metadata=()) -> grpc.StatusCode:
                    try:
                        await stub.Generate(request, metadata=metadata)
                        return grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        return e.code()

                lora = pb.GenerateRequest(prompt="x", adapter_id="lora")
                assert await code(lora) == grpc.StatusCode.FAILED_PRECONDITION  # no lease
                lease_id = leases.open("lora")
                for forged in ("f" * 32, "", "x" * 4000, "../" * 10, lease_id[:-1], lease_id.upper()):
                    got = await code(lora, ((LEASE_METADATA, forged),))
                    assert got == grpc.StatusCode.FAILED_PRECONDITION, forged[:40]
                # Past gRPC's metadata limit the transport itself refuses the call.
                assert await code(lora, ((LEASE_METADATA, "x" * 100_000),)) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert leases.adapter_of(lease_id) == "lora" and used == []  # the real lease untouched
                held = await _held(leases, lease_id)
                md = ((LEASE_METADATA, lease_id),)
                other = pb.GenerateRequest(prompt="x", adapter_id="victim")
                assert await code(other, md) == grpc.StatusCode.INVALID_ARGUMENT  # not the leased adapter
                assert not held.done() and used == []  # refused before the claim: the lease is still open
                assert await code(lora, md) == grpc.StatusCode.OK
                assert await code(lora, md) == grpc.StatusCode.FAILED_PRECONDITION  # one lease, one generation
                await asyncio.wait_for(held, 5)
                with pytest.raises(grpc.RpcError) as err:
                    await pb_grpc.AdapterServiceStub(channel).RegisterAdapter(
                        pb.RegisterAdapterRequest(adapter_id="victim", path="x", replace=True))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "through the cluster" in err.value.details()
        finally:
            await server.stop(0)

    asyncio.run(main())
