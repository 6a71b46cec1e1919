"""Isolation in the math, independent of input validation: stale or poisoned KV pages never reach a
row, and a row whose logits turn non-finite fails alone while every other row of its batch goes on.

Poisoned adapters are installed through the catalog directly, past the validation at the door.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import grpc
import pytest
import torch

from tests.reliability import runtime_fixtures
from tests.reliability.runtime_fixtures import assert_matches, gen, register

adapter_root = runtime_fixtures.adapter_root
references = runtime_fixtures.references


@pytest.fixture
def server(start_server, tiny_llama, adapter_root):
    # A small cache (32 pages of 16) so every request reuses pages the poison was written to.
    return start_server(tiny_llama, adapter_root=str(adapter_root), kv_cache_tokens=512, max_batch_size=16)


def _poison_pages(srv, value: float) -> None:
    """Fill every free KV page of every layer (keys and values) with `value`, on the engine thread.

    Pages the prefix cache holds are content (published full pages, never written again), not free
    memory: they are left alone; every other page, free or reused later, gets the poison."""
    engine = srv.app.engine
    cache = engine.cache

    def fill() -> None:
        published = engine.prefix_cache.holds if engine.prefix_cache is not None else (lambda page: False)
        for page in range(cache.num_pages):
            if published(page):
                continue
            rows = slice(page * cache.page_size, (page + 1) * cache.page_size)
            for t in cache.k + cache.v:
                t[rows] = value

    srv.app.engine.call(fill).result(10)


def _run_mixed(srv, jobs, prompts) -> list:
    """Submit every (adapter, prompt index) job while the engine is held, so they share batches."""
    srv.app.engine.call(lambda: time.sleep(0.5))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = [pool.submit(gen, srv, prompts[i], name or "") for name, i in jobs]
        results = []
        for f in futs:
            try:
                results.append(f.result())
            except grpc.RpcError as e:
                results.append(e)
        return results


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_poisoned_pages_never_reach_base_or_adapter_rows(server, references, value):
    prompts, refs = references
    register(server, "lora")
    register(server, "prefix")
    jobs = [(name, i) for name in (None, "lora", "prefix") for i in range(2)]  # two prompt lengths: padding
    for _ in range(2):  # the second round reuses pages the first one wrote and freed
        _poison_pages(server, value)
        for (name, i), resp in zip(jobs, _run_mixed(server, jobs, prompts), strict=True):
            assert not isinstance(resp, Exception), resp
            assert_matches(resp, refs[name][i])


def _spec(adapter_root, tiny_llama, name, poison: float, scale: float | None = None):
    from server.adapters.formats import AdapterLimits, load_adapter_dir
    from server.model.weights import read_model_args

    spec = load_adapter_dir(adapter_root / name, read_model_args(tiny_llama), AdapterLimits())
    modules = {}
    for i, (key, m) in enumerate(sorted(spec.weights.modules.items())):
        a = m.a.clone()
        if i == 3 and poison is not None:
            a[0, 0] = poison
        modules[key] = dataclasses.replace(m, a=a, scale=m.scale if scale is None else scale)
    return dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, modules=modules))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_poisoned_adapter_fails_its_own_rows_alone(server, references, adapter_root, tiny_llama, poison):
    prompts, refs = references
    register(server, "lora")
    register(server, "lora2")
    server.app.adapters.register("poisoned", _spec(adapter_root, tiny_llama, "lora3", poison))
    jobs = [(name, i) for name in (None, "lora", "poisoned", "lora2") for i in range(2)]
    for _ in range(2):  # the second round reuses the pages the poisoned rows wrote
        for (name, i), resp in zip(jobs, _run_mixed(server, jobs, prompts), strict=True):
            if name == "poisoned":
                assert isinstance(resp, grpc.RpcError), resp
                assert resp.code() == grpc.StatusCode.INTERNAL and "non-finite" in resp.details()
            else:
                assert not isinstance(resp, Exception), resp
                assert_matches(resp, refs[name][i])


@pytest.mark.parametrize("poison,scale", [(float("nan"), None), (None, 1e40)], ids=["nan-delta", "overflowing-sum"])
def test_merge_refuses_a_non_finite_delta_and_changes_nothing(server, references, adapter_root, tiny_llama,
                                                             poison, scale):
    from server.adapters.formats import AdapterFormatError

    prompts, refs = references
    layers = server.app.model.runtime.w.layers
    before = [t.clone() for lw in layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    with pytest.raises(AdapterFormatError, match="merge: .*(NaN or inf)"):
        server.app.adapters.register("poisoned", _spec(adapter_root, tiny_llama, "lora", poison, scale), merge=True)
    after = [t for lw in layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert server.app.residency.merged_entry is None
    assert_matches(gen(server, prompts[0]), refs[None][0])
    register(server, "lora", merge=True)  # a finite merge still works afterwards
    assert_matches(gen(server, prompts[1], "lora"), refs["lora"][1])
