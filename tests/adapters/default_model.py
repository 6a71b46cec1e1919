"""What the default-model adapter tests share (SmolLM2-135M-Instruct, marked slow): a server on the default
model, one chat prompt, every request of a test sent at once (one mixed batch) and each answer compared with
its reference (greedy tokens equal, logprobs within 1e-3)."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.serving import Running, make_request

N_NEW = 6
Reference = tuple[list[int], list[float]]  # greedy tokens, their logprobs


def start_default(start_server, adapter_root: Path, **overrides) -> tuple[Running, list[int]]:
    """A server on the default model reading adapters from `adapter_root`, and the test prompt's ids."""
    srv = start_server("default", adapter_root=str(adapter_root), kv_cache_tokens=2048, max_batch_size=8,
                       **overrides)
    return srv, srv.app.model.tokenizer.encode_chat([{"role": "user", "content": "Name a colour."}])


def generate_together(srv: Running, prompt: list[int], names, register=(),
                      mixes: dict[str, list[tuple[str, float]]] | None = None) -> dict:
    """Register the ids in `register` (each the folder of that name), then send one greedy request per name
    at once: None = the base model, a key of `mixes` = that weighted mix, else the adapter id. {name: response}."""
    for adapter_id in register:
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=adapter_id))
    mixes = mixes or {}
    requests = {}
    for name in names:
        req = make_request(token_ids=prompt, adapter_id="" if name is None or name in mixes else name,
                           max_new_tokens=N_NEW, ignore_eos=True, logprobs=True)
        req.adapters.extend(pb.AdapterWeight(adapter_id=a, weight=w) for a, w in mixes.get(name, []))
        requests[name] = req
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:  # one mixed batch
        futs = {name: pool.submit(srv.gen.Generate, req, timeout=120) for name, req in requests.items()}
        return {name: fut.result() for name, fut in futs.items()}


def assert_matches(resp: pb.GenerateResponse, ref: Reference, name) -> None:
    tokens, logprobs = ref
    assert list(resp.token_ids) == tokens, name
    assert max(abs(a.logprob - b) for a, b in zip(resp.logprobs, logprobs, strict=True)) < 1e-3, name
