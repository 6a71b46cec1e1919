"""Attention over the paged KV cache, the torch path (CPU; CUDA runs server.kernels.paged_attention).

What a step's rows share is computed once per step (:class:`StepPositions`: rotary tables, the
cache slots the new entries go to, the slots each row reads, the mask), so a layer issues only its
own work: one rotary over q and k together, one cache write each for K and V, one read each, SDPA.

Isolation: positions a row does not own (padding, entries not written yet) read the cache's null
slot, never written and zero, so masked scores are exactly -inf and their values exactly 0 (a NaN
left in a reused page cannot reach the row: it is selected out, never multiplied by zero). Padding
positions of a prefill chunk write to the scratch slot, never read.

Thread domain: the engine thread (like every forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from server.model.llama import PagedKVCache, StepInput


def rotary_tables(head_dim: int, theta: float, positions: int, device: str,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [P, D] and sin [P, D] with rotate-half's signs folded in: [-sin_lo, sin_hi].

    x*cos + roll(x, D/2)*sin equals transformers' x*cos + rotate_half(x)*sin bit for bit:
    roll gives [x_hi, x_lo] where rotate_half gives [-x_hi, x_lo], and (-a)*b == a*(-b) exactly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    cos = emb.cos().to(device=device, dtype=dtype)
    sin = emb.sin().to(device=device, dtype=dtype)
    half = head_dim // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, S, N, D] (q and k heads together) with cos/sin [B, S, 1, D] -> new tensor."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


@dataclass
class StepPositions:
    """One step's positions, shared by every layer."""

    cos: torch.Tensor  # [B, S, 1, D] rotary cos at each new token's position
    sin: torch.Tensor  # [B, S, 1, D] rotary sin, rotate-half signs folded in
    write_slots: torch.Tensor  # [B*S] flat cache slot of each new entry (padding: the scratch slot)
    read_slots: torch.Tensor  # [B*T] flat slot of each row's entries 0..T-1 (not owned: the null slot)
    mask: torch.Tensor  # [B, 1, S, T] bool: causal and within the row's entries
    kv_len: int  # T: the longest row's entries after this step

    @classmethod
    def build(cls, step: StepInput, cache: PagedKVCache, cos_table: torch.Tensor,
              sin_table: torch.Tensor) -> StepPositions:
        bsz, seq = step.input_ids.shape if step.input_ids is not None else step.input_embeds.shape[:2]
        offs = torch.arange(seq, device=step.start.device)
        q_index = step.start[:, None] + offs[None, :]  # [B, S] cache index = rotary position of each new token
        valid = offs[None, :] < step.lengths[:, None]  # [B, S]
        write = torch.where(valid, cache.slots(step.block_tables, torch.where(valid, q_index, 0)), cache.scratch_slot)
        kv_len = step.start + step.lengths  # [B]
        t_max = int(kv_len.max())
        k_index = torch.arange(t_max, device=offs.device)  # [T]
        k_pos = k_index.expand(bsz, t_max)  # [B, T]
        owned = k_pos < kv_len[:, None]  # [B, T]: entries this row has written (prefix, prompt, output)
        read = torch.where(owned, cache.slots(step.block_tables, k_pos), cache.null_slot)  # [B, T]
        mask = (k_index[None, None, :] <= q_index[:, :, None]) & owned[:, None, :]  # [B, S, T]
        return cls(cos=cos_table[q_index][:, :, None], sin=sin_table[q_index][:, :, None],
                   write_slots=write.reshape(-1), read_slots=read.reshape(-1), mask=mask[:, None], kv_len=t_max)


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache,
                    pos: StepPositions) -> torch.Tensor:
    """Write the new k, v [B, S, Hkv, D] into the cache, attend with q [B, S, H, D] over every entry
    each row owns -> [B, S, H*D]."""
    bsz, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    ck, cv = cache.k[layer], cache.v[layer]  # [slots, Hkv, D]
    ck.index_copy_(0, pos.write_slots, k.reshape(bsz * seq, kv_heads, dim))
    cv.index_copy_(0, pos.write_slots, v.reshape(bsz * seq, kv_heads, dim))
    kv_shape = (bsz, pos.kv_len, kv_heads, dim)
    keys = ck.index_select(0, pos.read_slots).view(kv_shape).transpose(1, 2)  # [B, Hkv, T, D]
    values = cv.index_select(0, pos.read_slots).view(kv_shape).transpose(1, 2)
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=pos.mask,
                                          enable_gqa=True)  # [B, H, S, D] (torch's CPU flash kernel)
    return attn.transpose(1, 2).reshape(bsz, seq, heads * dim)
