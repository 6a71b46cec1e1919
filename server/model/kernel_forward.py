"""The fused Triton kernels inside the shared forward (the CUDA path of server.model.llama).

``LlamaRuntime.forward_layers`` holds the one layer structure; ``KernelOps`` gives it the
launch-bound pieces fused: residual add + RMSNorm (server.kernels.norm), RoPE + KV-cache write
(server.kernels.rope) and attention straight from the pages (server.kernels.paged_attention),
where ``llama.TorchOps`` gathers K/V and calls SDPA. The dense projections stay cuBLAS matmuls
and LoRA goes through the step's adapter hooks (whose CUDA implementation runs
server.kernels.lora). Nothing here reads a device value on the host, so a decode step can be
captured in a CUDA graph (server.model.cuda_graphs). Under TRITON_INTERPRET=1 the same code runs
on CPU tensors: tests/kernels/test_kernel_forward.py checks it against the torch path that way.

Thread domain: the engine thread (like every forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from server.kernels.norm import add_rms_norm, rms_norm
from server.kernels.paged_attention import paged_attention
from server.kernels.rope import rope_write_kv

if TYPE_CHECKING:
    from server.model.llama import LlamaRuntime, PagedKVCache, StepInput


class KernelOps:
    """llama.StepOps on the Triton kernels (no per-step precomputation: the kernels read the page tables)."""

    def __init__(self, rt: LlamaRuntime, step: StepInput, cache: PagedKVCache):
        self.rt, self.step, self.cache = rt, step, cache

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.rt.args.rms_norm_eps
        if delta is None:
            return x, rms_norm(x, weight, eps)
        return add_rms_norm(x, delta, weight, eps)  # one launch for the residual add and the norm

    def attention(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        a, step, cache = self.rt.args, self.step, self.cache
        bsz, seq = qkv.shape[:2]
        q = rope_write_kv(qkv, self.rt.cos, self.rt.sin, step.start, step.lengths, step.block_tables,
                          cache.k[layer], cache.v[layer], cache.page_size, a.num_heads)  # [B, S, H, D]
        return paged_attention(q, cache.k[layer], cache.v[layer], step.block_tables, step.start, step.lengths,
                               cache.page_size).view(bsz, seq, a.num_heads * a.head_dim)

    def mlp_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        from server.model.llama import silu_mul

        return silu_mul(gate_up)


def kernel_forward(rt: LlamaRuntime, step: StepInput, cache: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
    """Logits [B, V] float32 at each row's last new token ([B, S, V] when `all_logits`), on the kernels."""
    return rt.forward_layers(step, KernelOps(rt, step, cache), all_logits)
