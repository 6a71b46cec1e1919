"""--lazy-adapters: requests load <adapter-root>/<id> on first use, once, as RegisterAdapter would."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import threading
import time

import grpc
import openai
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from bench.server_process import free_port
from tests.peft_reference import make_peft_adapter
from tests.serving import make_request

N_NEW = 6
KINDS = ["lora", "prompt", "prefix", "dora", "ia3"]


@pytest.fixture(scope="module")
def lazy_root(tmp_path_factory, tiny_model_factory):
    """Adapters of several kinds saved by PEFT, plus what an attacker could plant in the root."""
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("lazy-root")
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / kind, kind, seed=40 + i)
    make_peft_adapter(base, root / "lora2", "lora", seed=77, r=4)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "lora", outside / "lora")
    (root / "escape").symlink_to(outside / "lora")
    (root / "loop").symlink_to(root / "loop")
    (root / "file").write_text("not a folder")
    return root


@pytest.fixture
def lazy(start_server, tiny_llama, lazy_root):
    return start_server(tiny_llama, adapter_root=str(lazy_root), lazy_adapters=True, kv_cache_tokens=4096,
                        max_batch_size=16, http_port=free_port())


def gen(srv, adapter="", timeout=60, **kw):
    return srv.generate(prompt="the quick brown fox", adapter_id=adapter, max_new_tokens=N_NEW, ignore_eos=True,
                        logprobs=True, timeout=timeout, **kw)


def mix_request(weights: dict[str, float]) -> pb.GenerateRequest:
    req = make_request("the quick brown fox", max_new_tokens=N_NEW, ignore_eos=True)
    req.adapters.extend(pb.AdapterWeight(adapter_id=a, weight=w) for a, w in weights.items())
    return req


def same_output(a: pb.GenerateResponse, b: pb.GenerateResponse) -> bool:
    return list(a.token_ids) == list(b.token_ids) and all(
        abs(x.logprob - y.logprob) < 1e-6 for x, y in zip(a.logprobs, b.logprobs, strict=True))


def loads(srv, kind: str = "lora") -> float:
    return srv.app.metrics.registry.get_sample_value("adapterserve_adapter_loads_total",
                                                     {"type": kind, "result": "ok"}) or 0.0


def listed(srv) -> dict[str, str]:
    return {a.adapter_id: pb.AdapterState.Name(a.state)
            for a in srv.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters}


def openai_client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.app.http_port}/v1", api_key="none", max_retries=0,
                         timeout=60)


def test_lazy_load_equals_explicit_registration(lazy):
    base = gen(lazy)
    for kind in KINDS:
        first = gen(lazy, kind)  # not registered: loaded from <root>/<kind>
        assert kind in listed(lazy)
        lazy.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=f"explicit-{kind}", path=kind))
        assert same_output(first, gen(lazy, f"explicit-{kind}")), kind
        assert same_output(first, gen(lazy, kind)), kind  # served from the registry the second time
        assert not same_output(first, base), kind
    mix = lazy.gen.Generate(mix_request({"lora2": 0.5}))
    assert "lora2" in listed(lazy) and len(mix.token_ids) == N_NEW  # a weighted mix's member loads too
    chat = openai_client(lazy).completions.create(model="lora", prompt="the quick brown fox", max_tokens=N_NEW,
                                                  temperature=0)
    assert chat.choices[0].text


def test_missing_folder_is_not_found_and_off_without_the_flag(lazy, start_server, tiny_llama, lazy_root):
    with pytest.raises(grpc.RpcError) as info:
        gen(lazy, "nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "adapter store has no folder 'nope'" in info.value.details()
    with pytest.raises(openai.NotFoundError) as http_info:
        openai_client(lazy).completions.create(model="nope", prompt="hi", max_tokens=2)
    assert http_info.value.code == "model_not_found" and http_info.value.param == "model"
    plain = start_server(tiny_llama, adapter_root=str(lazy_root))  # without --lazy-adapters: nothing loads
    with pytest.raises(grpc.RpcError) as info:
        gen(plain, "lora")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "is not registered" in info.value.details()


@pytest.mark.parametrize("adapter_id,fragment", [
    ("../lora", "is not a valid adapter id"),
    ("lora/../lora", "is not a valid adapter id"),
    ("/etc", "is not a valid adapter id"),
    (".store", "is not a valid adapter id"),
    ("escape", "symlink leading outside the adapter root"),
    ("loop", "a symlink loop"),
    ("file", "is not a folder"),
])
def test_escapes_are_refused_naming_the_field(lazy, adapter_id, fragment):
    with pytest.raises(grpc.RpcError) as info:
        gen(lazy, adapter_id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("adapter_id: ") and fragment in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        lazy.gen.Generate(mix_request({"lora": 1.0, adapter_id: 1.0}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("adapters[1].adapter_id: ") and fragment in info.value.details()
    with pytest.raises(openai.BadRequestError) as http_info:
        openai_client(lazy).completions.create(model=adapter_id, prompt="hi", max_tokens=2)
    assert http_info.value.param == "model" and fragment in str(http_info.value)
    assert adapter_id not in listed(lazy)


def _hold_loads(srv, monkeypatch, release: threading.Event) -> tuple[list[str], list[str]]:
    """Make the server's store reads wait for `release`; returns the ids read and the ids requests asked
    for (``LazyAdapters.ensure`` calls), in order."""
    store, lazy = srv.app.lazy.store, srv.app.lazy
    real_load, real_ensure, calls, asked = store.load, lazy.ensure, [], []

    def held(adapter_id):
        calls.append(adapter_id)
        assert release.wait(60)
        return real_load(adapter_id)

    def ensure(adapter_id):
        asked.append(adapter_id)
        return real_ensure(adapter_id)

    monkeypatch.setattr(store, "load", held)
    monkeypatch.setattr(lazy, "ensure", ensure)
    return calls, asked


def _wait_for(predicate, what: str) -> None:
    end = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def test_concurrent_first_requests_load_once_without_blocking_others(lazy, monkeypatch):
    release = threading.Event()
    calls, asked = _hold_loads(lazy, monkeypatch, release)
    before = loads(lazy)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        waiting = [pool.submit(gen, lazy, "lora2") for _ in range(20)]
        _wait_for(lambda: len(asked) == 20, "not every request reached the server")
        impatient = pool.submit(gen, lazy, "lora2", timeout=0.5)  # goes away while the load is held
        with pytest.raises(grpc.RpcError) as info:
            impatient.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(gen(lazy).token_ids) == N_NEW  # other tenants are served while the load is held
        assert not any(f.done() for f in waiting)
        release.set()
        outputs = [f.result() for f in waiting]
    assert calls == ["lora2"] and loads(lazy) == before + 1
    assert all(same_output(o, outputs[0]) for o in outputs)
    lazy.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="explicit", path="lora2"))
    assert same_output(outputs[0], gen(lazy, "explicit"))


def test_a_failed_load_fails_every_waiter_alike_and_is_retried_later(lazy, lazy_root, monkeypatch):
    broken = lazy_root / "later"
    broken.mkdir()
    (broken / "adapter_model.bin").write_bytes(b"pickle")
    release = threading.Event()
    calls, asked = _hold_loads(lazy, monkeypatch, release)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(gen, lazy, "later") for _ in range(8)]
        _wait_for(lambda: len(asked) == 8, "not every request reached the server")
        release.set()
        errors = []
        for f in waiting:
            with pytest.raises(grpc.RpcError) as info:
                f.result()
            errors.append((info.value.code(), info.value.details()))
    assert calls == ["later"]
    assert set(errors) == {(grpc.StatusCode.INVALID_ARGUMENT,
                            "adapter_id: adapter 'later' in the adapter store: adapter folder holds adapter_model.bin "
                            "but no adapter_model.safetensors: safetensors only, pickle checkpoints are never opened "
                            "(save with safe_serialization=True; AdapterHub: save_adapter(..., use_safetensors=True) "
                            "writes adapter.safetensors)")}
    os.remove(broken / "adapter_model.bin")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lazy_root / "lora" / name, broken / name)
    assert same_output(gen(lazy, "later"), gen(lazy, "lora"))  # the failure did not stick
    assert calls == ["later", "later", "lora"]


def test_a_replace_in_the_store_is_seen_through_the_version_and_evict_reloads(lazy, lazy_root):
    store, catalog, lazy_adapters = lazy.app.store, lazy.app.adapters, lazy.app.lazy

    def files(name):
        return ((lazy_root / name / "adapter_config.json").read_bytes(),
                (lazy_root / name / "adapter_model.safetensors").read_bytes())

    first = store.write("swap", *files("lora"))
    old = gen(lazy, "swap")
    assert same_output(old, gen(lazy, "lora")) and catalog.get("swap").version == first.version
    assert not lazy_adapters.stale("swap")
    second = store.write("swap", *files("lora2"), replace=True)
    assert second.version != first.version and lazy_adapters.stale("swap")
    assert same_output(gen(lazy, "swap"), old)  # held until evicted (what the cluster's replace does on each replica)
    assert catalog.evict("swap") and not catalog.evict("swap")
    assert same_output(gen(lazy, "swap"), gen(lazy, "lora2"))
    assert catalog.get("swap").version == second.version and not lazy_adapters.stale("swap")
    assert store.remove("swap") and lazy_adapters.stale("swap")
    catalog.evict("swap")
    with pytest.raises(grpc.RpcError) as info:
        gen(lazy, "swap")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_lazy_adapters_take_part_in_lru_eviction(start_server, tiny_llama, lazy_root):
    srv = start_server(tiny_llama, adapter_root=str(lazy_root), lazy_adapters=True, max_resident_adapters=2)
    for name in ("lora", "lora2", "dora"):
        gen(srv, name)
    assert listed(srv) == {"lora": "REGISTERED", "lora2": "RESIDENT", "dora": "RESIDENT"}
    gen(srv, "lora")
    assert listed(srv) == {"lora": "RESIDENT", "lora2": "REGISTERED", "dora": "RESIDENT"}


def test_models_lists_the_store_and_list_adapters_what_is_loaded(lazy):
    ids = [m.id for m in openai_client(lazy).models.list().data]
    assert {"lora", "lora2", "prefix", "escape"} <= set(ids) and "file" not in ids and ".store" not in ids
    assert listed(lazy) == {}
    gen(lazy, "prefix")
    assert set(listed(lazy)) == {"prefix"}
    ids = [m.id for m in openai_client(lazy).models.list().data]
    assert ids.count("prefix") == 1
