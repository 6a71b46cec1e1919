"""The forward pass on the fused Triton kernels (the CUDA path of server.model.llama).

Same model, same inputs and outputs as ``LlamaRuntime.forward``'s torch path, with the
launch-bound pieces fused: residual add + RMSNorm (server.kernels.norm), RoPE + KV-cache write
(server.kernels.rope) and attention straight from the pages (server.kernels.paged_attention);
the dense projections stay cuBLAS matmuls and LoRA goes through the step's ``LoraDelta`` (whose
CUDA implementation runs server.kernels.lora). Nothing here reads a device value on the host,
so a decode step can be captured in a CUDA graph (server.model.cuda_graphs). Under
TRITON_INTERPRET=1 the same code runs on CPU tensors: tests/kernels/test_kernel_forward.py checks
it against the torch path that way. A change to the torch forward in llama.py needs its twin
here; that test fails until it has one.

Thread domain: the engine thread (like every forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.kernels.norm import add_rms_norm, rms_norm
from server.kernels.paged_attention import paged_attention
from server.kernels.rope import rope_write_kv

if TYPE_CHECKING:
    from server.model.llama import LlamaRuntime, PagedKVCache, StepInput


def kernel_forward(rt: LlamaRuntime, step: StepInput, cache: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
    """Logits [B, V] float32 at each row's last new token ([B, S, V] when `all_logits`)."""
    a, w = rt.args, rt.w
    x = w.embed[step.input_ids] if step.input_embeds is None else step.input_embeds.to(rt.dtype)  # [B, S, H]
    bsz, seq = x.shape[:2]
    lora = step.lora
    eps = a.rms_norm_eps
    h = rms_norm(x, w.layers[0].attn_norm, eps)
    for i, layer in enumerate(w.layers):
        proj = rt.proj[i]
        qkv = proj["qkv"](h)  # [B, S, q + 2kv]
        if lora is not None:
            lora.apply(i, "qkv", h, qkv)
        q = rope_write_kv(qkv, rt.cos, rt.sin, step.start, step.lengths, step.block_tables,
                          cache.k[i], cache.v[i], cache.page_size, a.num_heads)  # [B, S, H, D]
        attn = paged_attention(q, cache.k[i], cache.v[i], step.block_tables, step.start, step.lengths,
                               cache.page_size).view(bsz, seq, a.num_heads * a.head_dim)
        out = proj["o"](attn)
        if lora is not None:
            lora.apply(i, "o", attn, out)
        x, h = add_rms_norm(x, out, layer.mlp_norm, eps)
        gate_up = proj["gate_up"](h)  # [B, S, 2*inter]
        if lora is not None:
            lora.apply(i, "gate_up", h, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up  # [B, S, inter]
        down = proj["down"](act)
        if lora is not None:
            lora.apply(i, "down", act, down)
        next_norm = w.layers[i + 1].attn_norm if i + 1 < len(w.layers) else w.norm
        x, h = add_rms_norm(x, down, next_norm, eps)  # h: the next layer's input (or the final norm)
    if all_logits:
        return rt.logits(h)  # [B, S, V]
    last = h[torch.arange(bsz, device=h.device), step.lengths - 1]  # [B, H]
    return rt.logits(last)  # [B, V]
