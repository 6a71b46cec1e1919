"""server.cluster.lease without Ray: a lease ends when the generation naming it ends (answered, failed
or cancelled, on a real grpc.aio server), when none claims it in time, or when the replica closes;
ids are unguessable and a stale or foreign id claims nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from clients._common import LEASE_METADATA as CLIENT_LEASE_METADATA
from server.cluster.lease import LEASE_METADATA, LeaseInterceptor, Leases


def test_the_clients_name_the_lease_as_the_replicas_read_it():
    assert CLIENT_LEASE_METADATA == LEASE_METADATA


async def _held(leases: Leases, lease_id: str, claim_s: float = 5.0) -> asyncio.Task:
    task = asyncio.create_task(leases.hold(lease_id, claim_s))
    await asyncio.sleep(0)
    return task


def test_a_lease_ends_when_its_generation_ends_and_not_before():
    async def main():
        leases = Leases(asyncio.Event())
        lease_id = leases.open()
        assert len(lease_id) == 32 and leases.open() != lease_id  # 128 random bits each
        task = await _held(leases, lease_id)
        assert leases.claim(lease_id)
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


@pytest.mark.parametrize("how", ["answered", "failed", "streamed", "cancelled"])
def test_the_interceptor_releases_the_lease_however_the_call_ends(how):
    async def main():
        leases = Leases(asyncio.Event())
        server = grpc.aio.server(interceptors=[LeaseInterceptor(leases)])
        pb_grpc.add_GenerationServiceServicer_to_server(_Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            lease_id = leases.open()
            held = await _held(leases, lease_id)
            md = ((LEASE_METADATA, lease_id),)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                if how == "answered":
                    assert (await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=md)).text == "ok"
                elif how == "failed":
                    with pytest.raises(grpc.RpcError) as err:
                        await stub.Generate(pb.GenerateRequest(prompt="fail"), metadata=md)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                elif how == "streamed":
                    request = pb.GenerateRequest(params=pb.SamplingParams(max_new_tokens=3))
                    assert [m.text async for m in stub.GenerateStream(request, metadata=md)] == ["0", "1", "2"]
                else:
                    call = stub.GenerateStream(pb.GenerateRequest(), metadata=md)
                    await call.read()
                    await asyncio.sleep(0.05)
                    assert not held.done()  # the generation runs: the lease holds
                    call.cancel()
                # A call naming no lease, or another's id, releases nothing.
                other = leases.open()
                other_held = await _held(leases, other)
                await stub.Generate(pb.GenerateRequest(prompt="x"))
                await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=((LEASE_METADATA, "f" * 32),))
                await asyncio.wait_for(held, 5)
                await asyncio.sleep(0.05)
                assert not other_held.done()
                other_held.cancel()
        finally:
            await server.stop(0)

    asyncio.run(main())
