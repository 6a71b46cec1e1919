"""Decode steps replayed from CUDA graphs, one per batch-size bucket (``--cuda-graphs on``).

A decode step of B rows runs in the graph of the smallest bucket >= B. Each graph was captured
over static input buffers (token ids, cache starts, lengths, page tables, LoRA slot of each row);
a step copies its inputs into the first B rows and marks the rest as padding (lengths 0: they
write no KV and their logits are dropped), then replays. Adapter weights are read from the fixed
slot tensors of server.adapters.lora_batch.LoraSlots, so registering or evicting an adapter is
picked up by the next replay; only a reallocation of those tensors (a higher rank arrived, or a
projection no resident adapter targeted before) bumps ``LoraSlots.version`` and recaptures.
Steps the graphs do not cover run eagerly: prefill, more rows than the largest bucket, a merged
adapter's correction, wider page tables than captured.

Thread domain: the engine thread. CUDA only: ``DecodeGraphs`` is only built when the runtime's
device is CUDA; ``graphs_usable`` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.adapters.lora_kernels import KernelLora

if TYPE_CHECKING:
    from server.model.llama import LlamaRuntime, PagedKVCache, StepInput

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def graphs_usable(device: str) -> bool:
    """CUDA graphs need a CUDA device (the CPU path always runs eagerly)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """Smallest bucket that holds `rows`, or None when more rows than the largest."""
    return next((b for b in buckets if b >= rows), None)


@dataclass
class _Graph:
    replay: Callable[[], None] | None  # replays the captured step
    input_ids: torch.Tensor  # [Bb, 1] int64
    start: torch.Tensor  # [Bb] int64
    lengths: torch.Tensor  # [Bb] int64: 1 for real rows, 0 for padding
    tables: torch.Tensor  # [Bb, P] int64
    row_slots: torch.Tensor  # [Bb] int64, -1 = no LoRA
    logits: torch.Tensor  # [Bb, V] float32, written by each replay
    lora_version: int | None  # LoraSlots.version captured (None: captured without LoRA)
    cache: PagedKVCache | None = None  # the cache whose tensors the graph reads and writes (kept alive)
    slots: object | None = None  # the LoraSlots whose tensors the graph reads


class DecodeGraphs:
    """Captures lazily, per (bucket, whether LoRA slots exist), for one KV cache; see the module docstring."""

    def __init__(self, runtime: LlamaRuntime, buckets: tuple[int, ...] = BUCKETS):
        self.rt = runtime
        self.buckets = buckets
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}
        self._pool = None  # one memory pool shared by every captured graph
        self.captures = 0
        self.replays = 0

    def can_run(self, step: StepInput, cache: PagedKVCache) -> bool:
        """A plain decode step (one new token per row, token ids) that a bucket holds."""
        if step.input_ids is None or step.input_ids.shape[1] != 1:
            return False
        if bucket_for(step.input_ids.shape[0], self.buckets) is None:
            return False
        if step.lora is None:
            return True
        lora = step.lora.plain_lora() if hasattr(step.lora, "plain_lora") else step.lora
        if lora is None:  # per-row math beyond plain LoRA (other kinds, mixes, a merged adapter): eager
            return False
        if not getattr(lora, "active", False):
            return getattr(lora, "merged", None) is None
        return getattr(lora, "merged", None) is None and getattr(lora, "kernel", None) is not None

    def run(self, step: StepInput, cache: PagedKVCache) -> torch.Tensor:
        """Logits [B, V] float32 of a decode step, replayed from its bucket's graph."""
        rows = step.input_ids.shape[0]
        bucket = bucket_for(rows, self.buckets)
        lora = step.lora.plain_lora() if step.lora is not None else None
        slots = lora.slots if lora is not None and lora.active else None
        g = self._graph(bucket, cache, slots)
        width = step.block_tables.shape[1]
        g.input_ids[:rows].copy_(step.input_ids)
        g.start[:rows].copy_(step.start)
        g.lengths[:rows].fill_(1)
        g.lengths[rows:].zero_()
        g.tables[:rows, :width].copy_(step.block_tables)
        if slots is not None:
            g.row_slots[:rows].copy_(lora.kernel.row_slots)
        g.row_slots[rows:].fill_(-1)
        g.replay()
        self.replays += 1
        return g.logits[:rows]

    def _graph(self, bucket: int, cache: PagedKVCache, slots) -> _Graph:
        key = (bucket, slots is not None)
        g = self._graphs.get(key)
        version = None if slots is None else slots.version
        if g is None or g.lora_version != version or g.cache is not cache or g.slots is not slots:
            g = self._capture(bucket, cache, slots)
            self._graphs[key] = g
        return g

    def _capture(self, bucket: int, cache: PagedKVCache, slots) -> _Graph:
        from server.model.kernel_forward import kernel_forward
        from server.model.llama import StepInput

        dev = self.rt.device
        z = dict(dtype=torch.int64, device=dev)
        g = _Graph(replay=None, input_ids=torch.zeros((bucket, 1), **z), start=torch.zeros(bucket, **z),
                   lengths=torch.zeros(bucket, **z), tables=torch.zeros((bucket, cache.num_pages), **z),
                   row_slots=torch.full((bucket,), -1, **z), logits=None, lora_version=None, cache=cache,
                   slots=slots)
        lora = None
        if slots is not None:
            lora = KernelLora(slots, g.row_slots)
            g.lora_version = slots.version
        step = StepInput(start=g.start, lengths=g.lengths, block_tables=g.tables, input_ids=g.input_ids, lora=lora)

        def body() -> torch.Tensor:
            if lora is not None:
                lora._tokens = None  # regroup the rows inside the graph, from the static slot buffer
            return kernel_forward(self.rt, step, cache)  # all rows padding: nothing written to the cache

        g.replay, g.logits = self._record(body)
        self.captures += 1
        return g

    def _record(self, body: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm `body` up on a side stream (Triton compiles there), capture it; (replay, its output)."""
        dev = self.rt.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                body()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            out = body()
        if self._pool is None:
            self._pool = graph.pool()
        return graph.replay, out
