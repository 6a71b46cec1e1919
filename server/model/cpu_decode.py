"""The CPU decode path on our own kernels (server/kernels/cpu/decode.cpp), float32 or bfloat16, ``--matmul onednn``.

At a decode step (every row adds one token) a CPU step was bound by two things: the projections read
at oneDNN's packed-matmul rate at one row, and ~38 small eager torch ops per layer plus Python
between them. Here:

- :func:`gemv`: the projections and lm_head for 1..``GEMV_ROWS`` rows, one FMA pass over the weight,
  split over torch's threads (``server.model.linear.Projection`` routes to it);
- :class:`CpuKernelOps`: ``llama.StepOps`` on fused per-row kernels: residual add + RMSNorm in one
  pass, rotary + K/V write into the pages + attention of each row's query over its own pages (no
  gather copy), SiLU(gate) * up.

Adapter hooks are untouched: the ops take and return torch tensors between projections, so LoRA,
IA3, DoRA, LN tuning, prefixes and bottleneck rows work as on the torch path. The exact mode
(``--matmul blas``), prefill steps and float16 keep the torch path. In bfloat16 (where oneDNN runs
bf16, i.e. AVX-512 or AVX-NE-CONVERT CPUs) the kernels read bf16 weights, activations and KV and
compute in float32, rounding each output to bf16 where the torch path rounds it. If the extension cannot
be built here, one warning is logged and everything keeps the torch path.

Switches (module attributes, read at every call; ``bench.decode_step --ab`` flips them):
``FUSED_OPS`` (CpuKernelOps at decode steps), ``GEMV_ROWS`` and ``GEMV_ROWS_BF16`` (0 = never our gemv).

Thread domain: the engine thread (like every forward); the kernels release the GIL.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.model.llama import LlamaRuntime, PagedKVCache, StepInput

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the element types decode.cpp is compiled for
FUSED_OPS = True  # decode steps through CpuKernelOps
GEMV_ROWS = 8  # float32 projections of at most this many rows through our gemv (0: never; the kernel takes 16)
# bf16: oneDNN's bf16 matmul (AMX / AVX512_BF16 dot products) overtakes our float32-FMA gemv sooner: on a
# 2-core Xeon with AMX ours is 1.33x at 1-2 rows, 1.1x at 4, 0.92x at 6, 0.81x at 8 (bench/README.md).
GEMV_ROWS_BF16 = 4

_kernels: ModuleType | None = None
_tried = False


def kernels() -> ModuleType | None:
    """The compiled kernels module, built on first call; None when it cannot be built (warned once)."""
    global _kernels, _tried
    if not _tried:
        from server.kernels.cpu import load_decode_kernels

        _kernels, _tried = load_decode_kernels(), True
    return _kernels


def wanted(device: str, dtype: torch.dtype, use_onednn: bool) -> bool:
    """Whether a runtime should use our CPU kernels: CPU, float32 or bfloat16, the default (oneDNN) matmul
    mode (the exact mode stays on transformers' own kernels), and the extension builds here."""
    return str(device) == "cpu" and dtype in KERNEL_DTYPES and use_onednn and kernels() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [..., in] @ weight[out, in]^T (+ bias) -> [..., out] when x has 1..GEMV_ROWS rows (bf16:
    GEMV_ROWS_BF16), else None."""
    rows = GEMV_ROWS if weight.dtype == torch.float32 else GEMV_ROWS_BF16
    if _kernels is None or not 0 < x.numel() <= weight.shape[1] * min(rows, 16):
        return None
    return _kernels.gemv(x, weight, bias)


def decode_step(rt: LlamaRuntime, step: StepInput, cache: PagedKVCache) -> bool:
    """Whether CpuKernelOps can take `step`: one new token per row, a cache of the runtime's dtype, kernels built."""
    shape = step.input_ids.shape if step.input_ids is not None else step.input_embeds.shape
    return (FUSED_OPS and rt.use_cpu_kernels and shape[1] == 1 and cache.k[0].dtype == rt.dtype
            and _kernels is not None)


class CpuKernelOps:
    """llama.StepOps on our fused CPU kernels, for decode steps (S == 1): nothing is precomputed per
    step, the attention kernel reads each row's positions through its block table."""

    def __init__(self, rt: LlamaRuntime, step: StepInput, cache: PagedKVCache):
        self.rt, self.cache = rt, cache
        self.k = _kernels
        self.eps = rt.args.rms_norm_eps
        self.start = step.start.contiguous()  # [B] int64: the new token's cache index = rotary position
        self.tables = step.block_tables.contiguous()  # [B, P]
        self.heads, self.kv_heads = rt.args.num_heads, rt.args.num_kv_heads

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x, delta [B, 1, H]; weight [H] or per row [B, 1, H] -> ([B, 1, H], [B, 1, H])
        total, normed = self.k.add_rms_norm(x, delta, weight, self.eps)
        return total, normed

    def attention(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        # qkv [B, 1, (H + 2Hkv) * D] -> [B, 1, H * D]
        return self.k.rope_attend_decode(qkv, self.rt.cos, self.rt.sin, self.start, self.tables, self.cache.k[layer],
                                         self.cache.v[layer], self.cache.page_size, self.heads, self.kv_heads)

    def mlp_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.k.silu_mul(gate_up)  # [B, 1, 2I] -> [B, 1, I]
