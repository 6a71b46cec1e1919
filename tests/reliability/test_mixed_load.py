"""The server under a seeded mixed load: every adapter kind, cancels, short deadlines, adapter churn
(register / replace / unregister / merge), poisoned registrations, and adapter files changed after
registration. Every request ends in exactly one status, none is lost, greedy outputs equal PEFT's,
and the engine returns to idle (KV pages, running / waiting gauges, adapter references)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.reliability.conftest import N_NEW, running_server
from tests.reliability.load import KINDS, MixedLoad, rss_bytes

ALLOWED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}


@pytest.fixture(scope="module")
def server(tiny_llama, reliability_root):
    with running_server(tiny_llama, adapter_root=str(reliability_root), kv_cache_tokens=2048, max_batch_size=8,
                        max_resident_adapters=4) as srv:
        for kind in KINDS:
            srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=kind, path=kind), timeout=60)
        yield srv


def assert_idle(srv) -> None:
    """Engine, KV pages, gauges and adapter references all back to zero (waits for the last frees)."""
    app = srv.app
    end = time.monotonic() + 30
    while app.engine.num_active() and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.1)  # the engine's step that finished the last request also sets the gauges after it
    reg = app.metrics.registry
    assert app.engine.num_active() == 0
    assert app.engine.allocator.free_pages == app.engine.allocator.num_pages
    assert reg.get_sample_value("adapterserve_running_requests") == 0
    assert reg.get_sample_value("adapterserve_waiting_requests") == 0
    listed = srv.adapters.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters
    assert all(a.active_requests == 0 for a in listed), [(a.adapter_id, a.active_requests) for a in listed]


def assert_clean(tally) -> None:
    assert tally.lost == 0 and tally.double_terminal == 0, tally.summary()
    assert not tally.mismatches, tally.mismatches[:3]
    assert set(tally.statuses) <= ALLOWED, tally.summary()


def test_mixed_load_with_cancels_and_deadlines(server, greedy_refs):
    prompts, refs = greedy_refs
    load = MixedLoad(server, prompts, refs, [None, *KINDS], N_NEW, seed=1, concurrency=8)
    load.run(n_requests=24)  # warm-up: allocator arenas, thread pools, spare buffers
    assert_idle(server)
    rss0 = rss_bytes()
    tally = load.run(n_requests=160)
    assert_clean(tally)
    actions = {a for a, _ in tally.by_action}
    assert actions == {"greedy", "greedy_stream", "sampled", "cancel", "deadline"}, tally.by_action
    assert tally.statuses["OK"] >= 60 and tally.statuses["CANCELLED"] > 0, tally.summary()
    assert_idle(server)
    assert rss_bytes() - rss0 < 200 << 20, tally.summary()  # no per-request leak (KV is preallocated)


def test_churn_under_load_never_mixes_outputs(server, greedy_refs, reliability_root):
    """'churn' switches between two LoRAs (replace), is merged, unregistered; poisoned uploads are
    refused meanwhile. Requests for 'churn' get one adapter's output or NOT_FOUND, never a mix;
    everyone else's outputs stay exactly their references."""
    prompts, refs = greedy_refs
    lora_config = json.loads((reliability_root / "lora" / "adapter_config.json").read_text())
    tensors = st_load((reliability_root / "lora" / "adapter_model.safetensors").read_bytes())
    poisoned = []
    for mutate in ("nan", "alpha"):
        c, t = dict(lora_config), {k: v.clone() for k, v in tensors.items()}
        if mutate == "nan":
            next(iter(t.values())).view(-1)[0] = float("nan")
        else:
            c["lora_alpha"] = 1e308
        poisoned.append(pb.RegisterAdapterRequest(adapter_id="churn", replace=True, files=pb.AdapterFiles(
            config_json=json.dumps(c).encode(), safetensors=st_save(t))))
    stop = threading.Event()
    errors: list[str] = []
    cycles, merge_refused = [0], [0]

    def churn() -> None:
        reg = server.adapters.RegisterAdapter
        while not stop.is_set():
            try:
                reg(pb.RegisterAdapterRequest(adapter_id="churn", path="lora", replace=True), timeout=60)
                reg(pb.RegisterAdapterRequest(adapter_id="churn", path="lora2", replace=True), timeout=60)
                for bad in poisoned:
                    try:
                        reg(bad, timeout=60)
                        errors.append("a poisoned adapter was accepted")
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                            errors.append(f"poisoned: {e.code().name} {e.details()}")
                server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="churn"), timeout=60)
                try:
                    reg(pb.RegisterAdapterRequest(adapter_id="churn", path="lora", merge=True), timeout=60)
                except grpc.RpcError as e:  # the previous merged 'churn' may still drain its requests
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION or "already merged" not in e.details():
                        raise
                    merge_refused[0] += 1
                    time.sleep(0.05)
                    continue
                time.sleep(0.05)
                server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="churn"), timeout=60)
                cycles[0] += 1
            except grpc.RpcError as e:
                errors.append(f"churn: {e.code().name} {e.details()}")
                return

    churn_refs = dict(refs)
    churn_refs["churn"] = [None] * len(prompts)  # checked below: either LoRA's output, whole
    seen: list[tuple[int, list[int]]] = []

    class ChurnLoad(MixedLoad):
        def _one(self, tally, adapter, prompt, action, deadline, seed):
            if adapter != "churn":
                return super()._one(tally, adapter, prompt, action, deadline, seed)
            req = pb.GenerateRequest(adapter_id="churn", prompt_token_ids=pb.TokenIds(ids=prompts[prompt]),
                                     params=pb.SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
            try:
                resp = self.server.gen.Generate(req, timeout=60)
                status = "OK"
                with self._lock:
                    seen.append((prompt, list(resp.token_ids)))
            except grpc.RpcError as e:
                status = e.code().name
            with self._lock:
                tally.add("churn", status)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        tally = ChurnLoad(server, prompts, churn_refs, [None, "churn", "churn", "lora", "prefix"], N_NEW, seed=2,
                          concurrency=6).run(n_requests=120)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert cycles[0] >= 1, (cycles, merge_refused)
    assert tally.lost == 0 and tally.double_terminal == 0 and not tally.mismatches, tally.summary()
    assert set(tally.statuses) <= ALLOWED | {"NOT_FOUND"}, tally.summary()
    assert seen, tally.summary()
    for prompt, tokens in seen:
        assert tokens in (refs["lora"][prompt], refs["lora2"][prompt]), (prompt, tokens)
    assert_idle(server)


def test_files_changed_after_registration_do_not_change_the_adapter(server, greedy_refs, reliability_root):
    prompts, refs = greedy_refs
    folder = reliability_root / "mutable"
    shutil.copytree(reliability_root / "lora", folder)
    server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="mutable", path="mutable"), timeout=60)
    weights = folder / "adapter_model.safetensors"

    def served() -> list[int]:
        return list(server.generate(token_ids=prompts[1], adapter_id="mutable", max_new_tokens=N_NEW,
                                    ignore_eos=True).token_ids)

    data = weights.read_bytes()
    weights.unlink()  # deleted
    assert served() == refs["lora"][1]
    weights.write_bytes(data[: len(data) // 2])  # truncated
    assert served() == refs["lora"][1]
    shutil.copy(reliability_root / "lora2" / "adapter_model.safetensors", weights)  # replaced
    shutil.copy(reliability_root / "lora2" / "adapter_config.json", folder / "adapter_config.json")
    assert served() == refs["lora"][1]
    server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="mutable", path="mutable", replace=True),
                                    timeout=60)  # re-registering reads the new files
    assert served() == refs["lora2"][1]
    server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="mutable"), timeout=60)
    assert_idle(server)
