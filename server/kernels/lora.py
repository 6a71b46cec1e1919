"""Batched LoRA for a mixed batch: one shrink launch and one expand launch per projection group.

Operands are the slot tensors of server.adapters.lora_batch.LoraSlots:

    at    [slots, in, G*r]   A^T of every resident adapter, one r-wide block per projection j
    bt[j] [slots, r, w_j]    B^T * scale of projection j (w_j = its output width)

Every token carries a slot index (-1 = no LoRA). ``sort_tokens`` orders the tokens by slot on
the device (no host sync, so it can be captured in a CUDA graph); each program of a kernel then
takes one slot and a BLOCK_M-slice of that slot's tokens, exits early when the slice is empty,
and multiplies the gathered rows by that slot's weights. The grid is (row blocks x column
blocks, slots): fixed for a given token count, whatever the mix of adapters and ranks, which
covers both SGMV (prefill: long runs of one slot) and BGMV (decode: a few rows per slot). The
design follows vLLM's punica Triton kernels (``lora_shrink_op`` / ``lora_expand_op``); this is
our own smaller version over our slot layout. Accumulation is float32; the shrunk activations
stay float32 between the two launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.kernels.runtime import dot, next_pow2, tl, triton, upcast_dots

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


@dataclass
class SortedTokens:
    """Tokens grouped by LoRA slot; every tensor stays on the device."""

    order: torch.Tensor  # [N] int64: token indices sorted by slot (no-LoRA tokens last)
    counts: torch.Tensor  # [slots] int32: tokens of each slot
    starts: torch.Tensor  # [slots] int32: offset of each slot's first token in `order`


def sort_tokens(token_slots: torch.Tensor, num_slots: int) -> SortedTokens:
    """Group tokens [N] (slot index or -1) by slot with device ops only (graph-capturable)."""
    key = torch.where(token_slots < 0, num_slots, token_slots)  # [N], no-LoRA tokens go last
    n = key.shape[0]
    # A counting sort by one-hot cumsums: no sort kernel, nothing read back, fixed shapes.
    onehot = key[None, :] == torch.arange(num_slots + 1, device=key.device)[:, None]  # [slots+1, N]
    counts = onehot.sum(1, dtype=torch.int32)  # [slots+1]
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    rank = (onehot.cumsum(1, dtype=torch.int32) - 1).gather(0, key[None, :])[0]  # [N] index within its slot
    order = torch.empty_like(key).scatter_(0, (starts[key] + rank).long(), torch.arange(n, device=key.device))
    return SortedTokens(order, counts[:num_slots].contiguous(), starts[:num_slots].contiguous())


# ---------------------------------------------------------------------------- references
def shrink_reference(x: torch.Tensor, at: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [N, in], at [slots, in, R], token_slots [N] -> [N, R] float32 (zero rows for slot -1)."""
    w = at[token_slots.clamp_min(0)].float()  # [N, in, R]
    y = torch.bmm(x.float()[:, None, :], w)[:, 0]  # [N, R]
    return y * (token_slots >= 0)[:, None]


def expand_reference(shrunk: torch.Tensor, bts: list[torch.Tensor], columns: list[tuple[int, int]],
                     out: torch.Tensor, token_slots: torch.Tensor) -> None:
    """out[:, c0_j:c1_j] += shrunk[:, j*r:(j+1)*r] @ bt_j[slot] for each projection j, in place."""
    r = bts[0].shape[1]
    keep = (token_slots >= 0)[:, None]
    for j, ((c0, c1), bt) in enumerate(zip(columns, bts, strict=True)):
        b = bt[token_slots.clamp_min(0)].float()  # [N, r, w_j]
        y = torch.bmm(shrunk[:, None, j * r:(j + 1) * r].float(), b)[:, 0]  # [N, w_j]
        out[:, c0:c1] = (out[:, c0:c1].float() + y * keep).to(out.dtype)


# ---------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _slot_rows(order_ptr, counts_ptr, starts_ptr, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's share of the grid (row blocks x column blocks, slots): its slot, its column block,
        the token indices [BM] of its BLOCK_M-slice of that slot's tokens with their mask, and whether
        the slice is empty (the program then has nothing to do)."""
        pid = tl.program_id(0)
        slot = tl.program_id(1)
        n_blocks = tl.cdiv(n_cols, BLOCK_N)
        pid_m = pid // n_blocks
        count = tl.load(counts_ptr + slot)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < count
        rows = tl.load(order_ptr + tl.load(starts_ptr + slot) + offs_m, mask=row_ok, other=0)  # [BM] token indices
        return slot, pid % n_blocks, rows, row_ok, pid_m * BLOCK_M >= count

    @triton.jit
    def _shrink_kernel(x_ptr, at_ptr, y_ptr, order_ptr, counts_ptr, starts_ptr,
                       K, R, stride_xm, stride_as, stride_ak, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr):
        slot, pid_n, rows, row_ok, empty = _slot_rows(order_ptr, counts_ptr, starts_ptr, R, BLOCK_M, BLOCK_N)
        if empty:
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            w = tl.load(at_ptr + slot * stride_as + offs_k[:, None] * stride_ak + offs_n[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
            acc += dot(a, w, UPCAST)
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _expand_one(y_ptr, b_ptr, out_ptr, rows, row_ok, slot, pid_n, RANK, WIDTH, COL0,
                    j: tl.constexpr, stride_ym, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[rows, COL0 + n] += y[rows, j*RANK:(j+1)*RANK] @ b[slot] for one column block."""
        if pid_n * BLOCK_N < WIDTH:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < RANK
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < WIDTH
            s = tl.load(y_ptr + rows[:, None] * stride_ym + j * RANK + offs_r[None, :],
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR] float32
            b = tl.load(b_ptr + slot * RANK * WIDTH + offs_r[:, None] * WIDTH + offs_n[None, :],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
            acc = dot(s, b.to(tl.float32), True)
            o_ptrs = out_ptr + rows[:, None] * stride_om + COL0 + offs_n[None, :]
            o_mask = row_ok[:, None] & n_ok[None, :]
            cur = tl.load(o_ptrs, mask=o_mask, other=0.0)
            tl.store(o_ptrs, (cur.to(tl.float32) + acc).to(cur.dtype), mask=o_mask)

    @triton.jit
    def _expand_kernel(y_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, order_ptr, counts_ptr, starts_ptr,
                       RANK, W0, W1, W2, C0, C1, C2, MAX_W, stride_ym, stride_om,
                       NUM_PROJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):
        slot, pid_n, rows, row_ok, empty = _slot_rows(order_ptr, counts_ptr, starts_ptr, MAX_W, BLOCK_M, BLOCK_N)
        if empty:
            return
        _expand_one(y_ptr, b0_ptr, out_ptr, rows, row_ok, slot, pid_n, RANK, W0, C0, 0, stride_ym, stride_om,
                    BLOCK_M, BLOCK_N, BLOCK_R)
        if NUM_PROJ > 1:
            _expand_one(y_ptr, b1_ptr, out_ptr, rows, row_ok, slot, pid_n, RANK, W1, C1, 1, stride_ym, stride_om,
                        BLOCK_M, BLOCK_N, BLOCK_R)
        if NUM_PROJ > 2:
            _expand_one(y_ptr, b2_ptr, out_ptr, rows, row_ok, slot, pid_n, RANK, W2, C2, 2, stride_ym, stride_om,
                        BLOCK_M, BLOCK_N, BLOCK_R)


def shrink(x: torch.Tensor, at: torch.Tensor, tokens: SortedTokens) -> torch.Tensor:
    """x [N, in] (rows contiguous), at [slots, in, R] -> [N, R] float32; rows of no slot are left 0."""
    n, k = x.shape
    slots, _, r = at.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.zeros((n, r), dtype=torch.float32, device=x.device)
    block_n = min(BLOCK_N, next_pow2(r))
    grid = (triton.cdiv(n, BLOCK_M) * triton.cdiv(r, block_n), slots)
    _shrink_kernel[grid](x, at, y, tokens.order, tokens.counts, tokens.starts,
                         k, r, x.stride(0), at.stride(0), at.stride(1), y.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                         UPCAST=upcast_dots(x.dtype))
    return y


def expand(shrunk: torch.Tensor, bts: list[torch.Tensor], columns: list[tuple[int, int]],
           out: torch.Tensor, tokens: SortedTokens) -> None:
    """out [N, sum w_j] (rows contiguous) += per projection j: shrunk[:, j*r:(j+1)*r] @ bts[j][slot], in place."""
    if not 1 <= len(bts) <= 3:
        raise ValueError(f"expand takes 1 to 3 projections per group, got {len(bts)}")
    assert out.stride(1) == 1 and all(b.is_contiguous() for b in bts)
    n = out.shape[0]
    slots, rank = bts[0].shape[:2]
    widths = [c1 - c0 for c0, c1 in columns] + [0] * (3 - len(bts))
    cols = [c0 for c0, _ in columns] + [0] * (3 - len(bts))
    ptrs = list(bts) + [bts[0]] * (3 - len(bts))
    max_w = max(widths)
    grid = (triton.cdiv(n, BLOCK_M) * triton.cdiv(max_w, BLOCK_N), slots)
    _expand_kernel[grid](shrunk, *ptrs, out, tokens.order, tokens.counts, tokens.starts,
                         rank, *widths, *cols, max_w, shrunk.stride(0), out.stride(0),
                         NUM_PROJ=len(bts), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=next_pow2(rank))
