"""Attention that reads K/V through the page table: decode, prefill, and prefill after a cached prefix.

The KV cache of one layer is [num_pages * page_size, H_kv, D]; row b owns the pages
``block_tables[b]``, its new tokens sit at cache indices start[b] .. start[b] + lengths[b] - 1
(already written, see server.kernels.rope) and attend causally to every entry before them,
including a prompt/prefix adapter's entries. The torch reference gathers every row's K/V into a
contiguous [B, H_kv, T, D] copy per layer (what the CPU path does); the kernel instead loads
BLOCK_N cache entries at a time straight from their pages with an online softmax
(flash-attention style, float32 statistics). One program serves one KV head of one row and
BLOCK_M (query position, query head of that KV head's group) pairs, so grouped-query heads share
each K/V load and a decode step (one position, G heads) fills the tile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from server.kernels.runtime import dot, next_pow2, tl, triton, upcast_dots

BLOCK_M = 16
BLOCK_N = 32


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor,
                              page_size: int) -> torch.Tensor:
    """q [B, S, H, D] -> [B, S, H, D]: causal attention of each row's new tokens over its pages."""
    bsz, seq, heads, d = q.shape
    kv_len = start + lengths  # [B]
    t_max = int(kv_len.max())
    k_index = torch.arange(t_max, device=q.device)  # [T]
    page = torch.gather(block_tables, 1, (k_index // page_size).expand(bsz, t_max))
    flat = (page * page_size + k_index % page_size).reshape(-1)  # [B*T]
    kv_shape = (bsz, t_max, k_cache.shape[1], d)
    keys = k_cache.index_select(0, flat).view(kv_shape).transpose(1, 2)  # [B, Hkv, T, D]
    values = v_cache.index_select(0, flat).view(kv_shape).transpose(1, 2)
    q_index = start[:, None] + torch.arange(seq, device=q.device)[None, :]  # [B, S]
    mask = (k_index[None, None, :] <= q_index[:, :, None]) & (k_index[None, None, :] < kv_len[:, None, None])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         enable_gqa=True)  # [B, H, S, D]
    return out.transpose(1, 2)


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, start_ptr, lengths_ptr,
                                S, D, sm_scale, stride_qb, stride_qs, stride_qh, stride_ob, stride_os,
                                stride_oh, stride_kt, stride_kh, stride_tb,
                                GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        pid_m = tl.program_id(2)
        length = tl.load(lengths_ptr + b)
        if pid_m * BLOCK_M >= length * GROUP:
            return
        start = tl.load(start_ptr + b)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (position, head-in-group) pairs
        s = offs_m // GROUP
        head = hk * GROUP + offs_m % GROUP
        m_ok = s < length
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_ptr + b * stride_qb + s[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        q_pos = start + s  # [BM] cache index of each query
        kv_len = start + length
        last_s = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, length - 1)
        end = start + last_s + 1  # keys beyond the block's last query are never attended
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            t_ok = t < end
            page = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=t_ok, other=0)
            slot = page * PAGE + t % PAGE  # [BN] flat cache row
            kv_off = slot[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, BD]
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            scores = dot(q, tl.trans(k), UPCAST) * sm_scale  # [BM, BN] float32
            visible = (t[None, :] <= q_pos[:, None]) & (t[None, :] < kv_len) & t_ok[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + s[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    start: torch.Tensor, lengths: torch.Tensor, page_size: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of paged_attention_reference; q [B, S, H, D] (last dim contiguous) -> [B, S, H, D].

    Rows with lengths 0 (padding of a CUDA-graph bucket) are skipped; their output is undefined.
    """
    bsz, seq, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    grid = (bsz, kv_heads, triton.cdiv(seq * group, BLOCK_M))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, start, lengths, seq, d, 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        GROUP=group, PAGE=page_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=next_pow2(d),
        UPCAST=upcast_dots(q.dtype))
    return out
