"""RMSNorm, optionally fused with the residual add before it: one launch instead of five.

Numerics follow transformers (and server.model.llama.rms_norm): the mean of squares in float32,
the normalised row rounded to the model dtype, then multiplied by the weight; the residual sum is
rounded to the model dtype first, as ``x + out`` in torch is.
"""

from __future__ import annotations

import torch

from server.kernels.runtime import next_pow2, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> weight * (x / rms(x)), the statistics in float32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) for x, delta [..., H]."""
    s = x + delta
    return s, rms_norm_reference(s, weight, eps)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, H, eps,
                         HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_H)
        ok = offs < H
        x = tl.load(x_ptr + row * H + offs, mask=ok, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * H + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * H + offs, x, mask=ok)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / H + eps)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        y = (x32 * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * H + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton rms_norm_reference over the last dim of a contiguous x."""
    h = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    _rms_norm_kernel[(x.numel() // h,)](x, x, weight, x, out, h, eps, HAS_DELTA=False, BLOCK_H=next_pow2(h))
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton add_rms_norm_reference: (x + delta, its RMSNorm) in one launch."""
    h = x.shape[-1]
    x, delta = x.contiguous(), delta.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    _rms_norm_kernel[(x.numel() // h,)](x, delta, weight, total, out, h, eps, HAS_DELTA=True,
                                         BLOCK_H=next_pow2(h))
    return total, out
