"""The fused-kernel forward (the CUDA path) against the torch forward, on CPU under the interpreter.

Same tiny model and inputs through both paths: ragged prefill, prefill after a cached prefix,
decode, with LoRA rows of mixed ranks, base rows and unsorted slots. Also the CPU fallbacks of
the CUDA-only pieces (graphs, side-stream uploads, kernel selection).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.adapters.lora_batch import LoraBatch, LoraSlots
from server.adapters.slot_uploads import SlotUploader, side_stream_uploads
from server.model.cuda_graphs import DecodeGraphs, bucket_for, graphs_usable
from server.model.kernel_dispatch import kernels_wanted
from server.model.llama import LlamaRuntime, PagedKVCache, StepInput
from server.model.loader import load_model


def _adapters(args, n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        rank = (2, 8, 4)[i % 3]
        mods = {}
        for layer in range(args.num_layers):
            for name in ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")[i % 2:]:
                o, k = args.linear_shape(name)
                mods[(layer, name)] = SimpleNamespace(a=torch.randn(rank, k, generator=gen) * 0.2,
                                                      b=torch.randn(o, rank, generator=gen) * 0.2, scale=1.0 + i)
        out.append(mods)
    return out


@pytest.fixture(scope="module")
def runtimes(tiny_model_factory):
    folder = tiny_model_factory("llama")
    torch_rt = load_model(str(folder), matmul="blas", kernels="torch").runtime
    triton_rt = LlamaRuntime(torch_rt.args, torch_rt.w, "cpu", torch.float32, matmul="blas", kernels="triton")
    assert triton_rt.use_kernels and not torch_rt.use_kernels and triton_rt.graphs is None
    return torch_rt, triton_rt


def _slots(args, use_kernels: bool) -> LoraSlots:
    slots = LoraSlots(args, 4, "cpu", torch.float32)
    slots.use_kernels = use_kernels
    for i, mods in enumerate(_adapters(args, 3)):
        slots.load(i, mods)
    return slots


STEPS = {  # name -> (start per row, new tokens per row, LoRA slot per row)
    "ragged prefill, mixed adapters": ([0, 0, 0], [6, 3, 1], [1, -1, 0]),
    "prefill after a cached prefix": ([5, 9], [4, 2], [2, 2]),
    "decode, unsorted slots": ([11, 13, 12, 11], [1, 1, 1, 1], [2, 0, -1, 0]),
}


@pytest.mark.parametrize("name", STEPS, ids=list(STEPS))
def test_kernel_forward_matches_torch_forward(runtimes, name):
    torch_rt, triton_rt = runtimes
    args = torch_rt.args
    starts, lengths, row_slots = STEPS[name]
    bsz, seq, page = len(starts), max(lengths), 4
    gen = torch.Generator().manual_seed(7)
    tables = torch.stack([torch.randperm(24, generator=gen)[:6] for _ in range(bsz)])  # scattered pages
    caches = []
    for _ in range(2):
        cache = PagedKVCache(args, num_pages=24, page_size=page, dtype=torch.float32, device="cpu")
        for layer in range(args.num_layers):  # the same cached context (prefix / earlier tokens) in both
            g = torch.Generator().manual_seed(layer)
            cache.k[layer].copy_(torch.randn(cache.k[layer].shape, generator=g))
            cache.v[layer].copy_(torch.randn(cache.v[layer].shape, generator=g))
        caches.append(cache)
    ids = torch.randint(0, args.vocab_size, (bsz, seq), generator=gen)
    logits = []
    for rt, cache in zip((torch_rt, triton_rt), caches, strict=True):
        lora = LoraBatch(_slots(args, rt.use_kernels), row_slots, None)
        assert (lora.kernel is not None) == rt.use_kernels
        step = StepInput(start=torch.tensor(starts), lengths=torch.tensor(lengths), block_tables=tables,
                         input_ids=ids, lora=lora)
        logits.append(rt.forward(step, cache))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    kept = slice(0, caches[0].null_slot + 1)  # pages and the null slot (the scratch slot holds padding)
    for layer in range(args.num_layers):  # the new tokens' K/V landed in the same slots
        torch.testing.assert_close(caches[1].k[layer][kept], caches[0].k[layer][kept], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].v[layer][kept], caches[0].v[layer][kept], rtol=1e-5, atol=1e-5)


def test_cuda_only_pieces_fall_back_on_cpu():
    assert not graphs_usable("cpu") and not side_stream_uploads("cpu")
    assert not kernels_wanted("auto", "cpu") and not kernels_wanted("torch", "cpu")
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels_wanted("fast", "cpu")
    up = SlotUploader("cpu")  # CPU: plain synchronous in-place writes
    dst = torch.zeros(2, 3)
    up.copy_scaled(dst[0], torch.ones(3), 2.0)
    up.done()
    up.wait()
    assert dst.tolist() == [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
    assert [bucket_for(n) for n in (1, 3, 64, 65, 256, 257)] == [1, 4, 64, 96, 256, None]


class _ReplayByRerun(DecodeGraphs):
    """DecodeGraphs with capture replaced by re-running the captured body over the static buffers:
    on CPU this checks everything but the CUDA capture itself (buffers, padding rows, recapture rules)."""

    def _record(self, body):
        out = body()
        return (lambda: out.copy_(body())), out


def test_graph_runner_logic_with_static_buffers(runtimes):
    torch_rt, triton_rt = runtimes
    args = torch_rt.args
    graphs = _ReplayByRerun(triton_rt, buckets=(2, 4))
    slots = _slots(args, use_kernels=True)
    gen = torch.Generator().manual_seed(3)
    tables = torch.stack([torch.randperm(24, generator=gen)[:4] for _ in range(3)])
    caches = []
    for _ in range(2):
        cache = PagedKVCache(args, num_pages=24, page_size=4, dtype=torch.float32, device="cpu")
        for layer in range(args.num_layers):
            cache.k[layer].normal_(generator=torch.Generator().manual_seed(layer))
        caches.append(cache)

    def step(row_slots, ids):
        return StepInput(start=torch.tensor([5, 9, 2]), lengths=torch.ones(3, dtype=torch.long), block_tables=tables,
                         input_ids=ids, lora=LoraBatch(slots, row_slots, None))

    ids = torch.tensor([[3], [7], [11]])
    s = step([1, -1, 0], ids)
    assert graphs.can_run(s, caches[0])
    got = graphs.run(s, caches[0])  # 3 rows in the 4-row bucket: one padding row
    want = torch_rt.forward(step([1, -1, 0], ids), caches[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for layer in range(args.num_layers):  # the padding row wrote nothing
        torch.testing.assert_close(caches[0].k[layer], caches[1].k[layer], rtol=1e-5, atol=1e-5)
    assert graphs.captures == 1
    slots.load(3, _adapters(args, 3)[0])  # a new adapter in a free slot, same rank: no recapture
    got = graphs.run(step([3, 3, -1], ids), caches[0])
    want = torch_rt.forward(step([3, 3, -1], ids), caches[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert graphs.captures == 1 and graphs.replays == 2
    big = _adapters(args, 1)[0]
    for mod in big.values():  # a higher rank reallocates the slot tensors: one recapture
        mod.a, mod.b = torch.cat([mod.a] * 8), torch.cat([mod.b] * 8, 1) / 8  # rank 2 -> 16
    slots.load(2, big)
    graphs.run(step([2, 0, 1], ids), caches[0])
    assert graphs.captures == 2
    merged = StepInput(start=torch.tensor([1]), lengths=torch.tensor([1]), block_tables=tables[:1],
                       input_ids=torch.tensor([[1]]), lora=SimpleNamespace(merged=object(), active=True))
    assert not graphs.can_run(merged, caches[0])  # a merged adapter's correction runs eagerly
    wide = StepInput(start=torch.zeros(5, dtype=torch.long), lengths=torch.ones(5, dtype=torch.long),
                     block_tables=torch.zeros(5, 1, dtype=torch.long), input_ids=torch.zeros(5, 1, dtype=torch.long))
    assert not graphs.can_run(wide, caches[0])  # more rows than the largest bucket
