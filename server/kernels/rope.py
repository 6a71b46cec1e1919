"""Rotary embedding of q and k fused with the KV-cache write: one launch per layer.

Input is the fused projection output qkv [B, S, H*D + 2*H_kv*D]. Each new token of row b sits
at cache index start[b] + s (its rotary position, see server.model.llama); tokens past
lengths[b] are padding and write nothing (so padding rows of a CUDA-graph bucket, lengths 0,
never touch the cache and no boolean indexing forces a host sync). Rounding follows the torch
form ``q * cos + rotate_half(q) * sin`` in the model dtype.
"""

from __future__ import annotations

import torch

from server.kernels.runtime import next_pow2, tl, triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_write_kv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor,
                            lengths: torch.Tensor, block_tables: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, page_size: int, heads: int) -> torch.Tensor:
    """Rotate q and k, write k and v of valid tokens into the cache; return q [B, S, H, D]."""
    bsz, seq, _ = qkv.shape
    kv_heads, d = k_cache.shape[1], k_cache.shape[2]
    q = qkv[..., :heads * d].reshape(bsz, seq, heads, d)
    k = qkv[..., heads * d:(heads + kv_heads) * d].reshape(bsz, seq, kv_heads, d)
    v = qkv[..., (heads + kv_heads) * d:].reshape(bsz, seq, kv_heads, d)
    pos = start[:, None] + torch.arange(seq, device=qkv.device)[None, :]  # [B, S]
    valid = torch.arange(seq, device=qkv.device)[None, :] < lengths[:, None]
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]  # [B, S, 1, D]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    page = torch.gather(block_tables, 1, torch.where(valid, pos, 0) // page_size)
    slots = (page * page_size + torch.where(valid, pos, 0) % page_size)[valid]
    k_cache[slots] = k[valid]
    v_cache[slots] = v[valid]
    return q


if triton is not None:

    @triton.jit
    def _rotate(x_ptr, cos_ptr, sin_ptr, HALF, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        ok = offs < HALF
        x1 = tl.load(x_ptr + offs, mask=ok, other=0.0)
        x2 = tl.load(x_ptr + HALF + offs, mask=ok, other=0.0)
        c1 = tl.load(cos_ptr + offs, mask=ok, other=0.0)
        c2 = tl.load(cos_ptr + HALF + offs, mask=ok, other=0.0)
        s1 = tl.load(sin_ptr + offs, mask=ok, other=0.0)
        s2 = tl.load(sin_ptr + HALF + offs, mask=ok, other=0.0)
        dt = x1.dtype
        f32 = tl.float32  # arithmetic in float32 (the interpreter cannot do bfloat16 math)
        x1, x2, c1, c2, s1, s2 = x1.to(f32), x2.to(f32), c1.to(f32), c2.to(f32), s1.to(f32), s2.to(f32)
        # (x * cos) and (rotate_half(x) * sin) each rounded to the model dtype, then their sum
        y1 = (x1 * c1).to(dt).to(f32) - (x2 * s1).to(dt).to(f32)
        y2 = (x2 * c2).to(dt).to(f32) + (x1 * s2).to(dt).to(f32)
        return y1.to(dt), y2.to(dt), offs, ok

    @triton.jit
    def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, start_ptr, lengths_ptr, tables_ptr, k_ptr, v_ptr, q_ptr,
                           S, HEADS, KV_HEADS, D, stride_qkv_t, stride_cos, stride_kt, stride_kh, stride_tb,
                           PAGE: tl.constexpr, BLOCK: tl.constexpr):
        tok = tl.program_id(0)  # b * S + s
        head = tl.program_id(1)  # 0..HEADS-1: q heads, then HEADS..HEADS+KV_HEADS-1: kv heads
        b = tok // S
        s = tok % S
        pos = tl.load(start_ptr + b) + s
        half = D // 2
        row = qkv_ptr + tok.to(tl.int64) * stride_qkv_t
        cos_row = cos_ptr + pos.to(tl.int64) * stride_cos
        sin_row = sin_ptr + pos.to(tl.int64) * stride_cos
        if head < HEADS:
            y1, y2, offs, ok = _rotate(row + head * D, cos_row, sin_row, half, BLOCK)
            dst = q_ptr + (tok.to(tl.int64) * HEADS + head) * D
            tl.store(dst + offs, y1, mask=ok)
            tl.store(dst + half + offs, y2, mask=ok)
        elif s < tl.load(lengths_ptr + b):
            hk = head - HEADS
            page = tl.load(tables_ptr + b * stride_tb + pos // PAGE)
            slot = (page * PAGE + pos % PAGE).to(tl.int64)
            y1, y2, offs, ok = _rotate(row + (HEADS + hk) * D, cos_row, sin_row, half, BLOCK)
            dst = k_ptr + slot * stride_kt + hk * stride_kh
            tl.store(dst + offs, y1, mask=ok)
            tl.store(dst + half + offs, y2, mask=ok)
            offs_d = tl.arange(0, 2 * BLOCK)
            v = tl.load(row + (HEADS + KV_HEADS + hk) * D + offs_d, mask=offs_d < D, other=0.0)
            tl.store(v_ptr + slot * stride_kt + hk * stride_kh + offs_d, v, mask=offs_d < D)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor,
                  lengths: torch.Tensor, block_tables: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  page_size: int, heads: int) -> torch.Tensor:
    """Triton rope_write_kv_reference; qkv [B, S, *] contiguous, caches [slots, H_kv, D] contiguous."""
    bsz, seq, width = qkv.shape
    kv_heads, d = k_cache.shape[1], k_cache.shape[2]
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty((bsz, seq, heads, d), dtype=qkv.dtype, device=qkv.device)
    _rope_write_kernel[(bsz * seq, heads + kv_heads)](
        qkv, cos, sin, start, lengths, block_tables, k_cache, v_cache, q,
        seq, heads, kv_heads, d, width, cos.stride(0), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        PAGE=page_size, BLOCK=next_pow2(d // 2, floor=1))
    return q
