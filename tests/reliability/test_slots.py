"""Nothing waits forever: pins and merges never take the last resident place, and a request that could
never be scheduled is answered at once instead of being parked until its deadline."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.reliability import runtime_fixtures
from tests.reliability.runtime_fixtures import assert_matches, gen, register

adapter_root = runtime_fixtures.adapter_root
references = runtime_fixtures.references


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_pins_and_merges_never_take_the_last_place(start_server, tiny_llama, adapter_root, references):
    prompts, refs = references
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), max_resident_adapters=2)
    register(srv, "lora", pin=True)
    err = _refused(lambda: register(srv, "lora2", pin=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--max-resident-adapters" in err.details()
    err = _refused(lambda: register(srv, "lora2", merge=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and err.details().startswith("merge:")
    assert {a.adapter_id for a in srv.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters} == {"lora"}
    register(srv, "lora2")
    register(srv, "lora3")
    # The one unpinned place serves lora2 and lora3 in turn: every request is answered, none parked.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futs = [(n, pool.submit(gen, srv, prompts[0], n, timeout=120)) for n in ["lora", "lora2", "lora3"] * 2]
        for n, f in futs:
            assert_matches(f.result(), refs[n][0])


def test_memory_budget_keeps_room_beside_pinned_adapters(start_server, tiny_llama, adapter_root, references):
    prompts, refs = references
    from server.adapters.formats import AdapterLimits, load_adapter_dir
    from server.model.weights import read_model_args

    def size(name):
        return load_adapter_dir(adapter_root / name, read_model_args(tiny_llama), AdapterLimits()).size_bytes

    assert size("lora3") > size("lora2")
    budget = size("lora") + size("lora2")  # the pinned lora leaves room for lora2, not for lora3
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), adapter_memory_bytes=budget)
    register(srv, "lora2")
    register(srv, "lora", pin=True)
    err = _refused(lambda: register(srv, "lora3"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--adapter-memory-bytes" in err.details()
    assert_matches(gen(srv, prompts[1], "lora2"), refs["lora2"][1])
    # Pinning a second copy of lora2 beside lora would leave no room for the registered lora2.
    err = _refused(lambda: register(srv, "lora2-pinned", path="lora2", pin=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--adapter-memory-bytes" in err.details()
    assert_matches(gen(srv, prompts[0], "lora2"), refs["lora2"][0])


def test_an_adapter_larger_than_the_whole_budget_is_refused_not_parked(start_server, tiny_llama, adapter_root):
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), adapter_memory_bytes=1000)
    err = _refused(lambda: register(srv, "lora"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--adapter-memory-bytes" in err.details()


def test_a_request_that_can_never_be_scheduled_is_answered_at_once(start_server, tiny_llama, adapter_root,
                                                                  references):
    prompts, refs = references
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), max_resident_adapters=2)
    register(srv, "lora", pin=True)
    register(srv, "lora2")
    register(srv, "lora3")
    # A state registration refuses (every place held by pinned adapters), forced from the engine thread:
    # the engine itself must still answer instead of parking the request until its deadline.
    residency = srv.app.residency

    def pin_lora2():
        lora2 = next(e for e in residency._installed.values() if e.adapter_id == "lora2")
        residency._make_resident(lora2, count=False)
        lora2.pinned = True

    srv.app.engine.call(pin_lora2).result(10)
    err = _refused(lambda: gen(srv, prompts[0], "lora3", timeout=120))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "lora3" in err.details()
    assert_matches(gen(srv, prompts[0], "lora2"), refs["lora2"][0])
    assert_matches(gen(srv, prompts[0]), refs[None][0])
