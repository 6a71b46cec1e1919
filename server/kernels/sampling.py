"""Per-row sampling without sorting the vocabulary: temperature, top-k, top-p and the draw in one launch.

The torch path (server.engine.sampler.draw, the CPU path and this kernel's reference) sorts every
sampling row, masks ranks >= top_k, keeps the smallest prefix whose mass reaches top_p and inverts
the CDF of what is left, in descending order, at the row's uniform u. The kernel computes the
same function with threshold searches instead of a sort (as FlashInfer's and vLLM's GPU samplers
avoid a full sort): one program per row, and each quantity the sort would give is the answer to
"the smallest value t such that the count (or mass) of the row's values above t is below a bound":

    top-k cutoff   t_k: smallest t with #{v > t} < k                (the k-th largest value)
    top-p cutoff   c:   smallest t >= t_k with mass{v > t} < top_p * mass(top-k set)
    the draw       d:   smallest t >= c with mass{v > t} <= u * mass(kept set)

Values are searched as integers: float32 bits mapped to an order-preserving int32 key, so each
search is exact; every pass over the row evaluates NUM_PIVOTS pivots at once (about 4 bits of the
key per pass with 16 pivots: at most 8 passes per search, fewer for a narrow range). Ties are
broken by token index, lowest first, as the torch path's stable sort does: k tied values at the
top-k cutoff keep the first ones, and a tie group at the top-p cutoff or at the draw is entered in
index order. The mass is exp(v - max) in float32 (torch: softmax then cumsum), so the two paths
agree token for token except where u * mass, or a top-p bound, falls within float32 rounding
(~1e-7 relative) of a boundary between two tokens. Greedy rows (temperature below the sampler's
threshold) take the first index of the maximum, exactly as torch.argmax.

Scaled values are clamped to float32's finite range (3.4028234663852886e38) as the torch path
clamps them, so -inf logits (masked EOS) become the lowest value, of probability 0.

Cost per sampling row: 1 pass for max/min, up to 8 per active search (top-k, top-p, the draw), 1
or 2 to weigh the cutoff's tie group, 1 to find the chosen token; each pass reads the row's logits once
(BLOCK at a time). Thread domain: the engine thread.
"""

from __future__ import annotations

import torch

from server.kernels.runtime import tl, triton

BLOCK = 1024
NUM_PIVOTS = 16


if triton is not None:
    @triton.jit
    def _key(s):
        """Order-preserving int32 key of float32 values (-0.0 already mapped to +0.0)."""
        bits = s.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _block(x_ptr, v0, V, temp, BLOCK: tl.constexpr):
        """One block of the row from v0: scaled values s [BLOCK] clamped to float32's finite range (as
        the torch path clamps them; -0.0 becomes +0.0), their order keys, the in-row mask, the indices."""
        offs = v0 + tl.arange(0, BLOCK)
        ok = offs < V
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s = tl.minimum(tl.maximum(tl.div_rn(x, temp), -3.4028234663852886e38), 3.4028234663852886e38) + 0.0
        return s, _key(s), ok, offs

    @triton.jit
    def _value(key):
        """The float32 value of an order key (inverse of _key)."""
        key = key.to(tl.int32)
        bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _above(x_ptr, V, temp, m, pivots, COUNT: tl.constexpr, MASS: tl.constexpr, BLOCK: tl.constexpr,
               NP: tl.constexpr):
        """For each pivot key [NP]: (count, mass exp(v - m)) of the row's values v with key > pivot, in one
        pass over the row (each only when asked; zeros otherwise)."""
        count = tl.zeros((NP,), dtype=tl.float32)
        mass = tl.zeros((NP,), dtype=tl.float32)
        piv = pivots.to(tl.int32)
        for v0 in range(0, V, BLOCK):
            s, key, ok, offs = _block(x_ptr, v0, V, temp, BLOCK)
            hit = (key[:, None] > piv[None, :]) & ok[:, None]  # [BLOCK, NP]
            if COUNT:
                count += tl.sum(hit.to(tl.float32), 0)
            if MASS:
                mass += tl.sum(tl.where(hit, tl.exp(s - m)[:, None], 0.0), 0)
        return count, mass

    @triton.jit
    def _search(x_ptr, V, temp, m, lo, hi, s_hi, bound, MASS: tl.constexpr, STRICT: tl.constexpr,
                BLOCK: tl.constexpr, NP: tl.constexpr):
        """Smallest key t in (lo, hi] with S(t) < bound (<= when not STRICT), S(t) the count (or the mass)
        of values with key > t; S(lo) must fail and S(hi) = s_hi pass on entry. Returns (t, S(t))."""
        idx = tl.arange(0, NP).to(tl.int64) + 1
        lo = lo.to(tl.int64)
        hi = hi.to(tl.int64)
        s_hi = s_hi * 1.0  # a float32 tensor even when the caller passes a literal (the loop carries it)
        while hi - lo > 1:
            pivots = lo + ((hi - lo) * idx) // (NP + 1)  # [NP] in [lo, hi), the last one > lo
            count, mass = _above(x_ptr, V, temp, m, pivots, not MASS, MASS, BLOCK, NP)
            stat = mass if MASS else count
            if STRICT:
                ok = stat < bound
            else:
                ok = stat <= bound
            new_hi = tl.min(tl.where(ok, pivots, hi), 0)
            s_new = tl.max(tl.where(ok & (pivots == new_hi), stat, -1.0), 0)
            s_hi = tl.where(new_hi < hi, s_new, s_hi)
            lo = tl.max(tl.where(ok, lo, pivots), 0)
            hi = new_hi
        return hi, s_hi

    @triton.jit
    def _at(x_ptr, V, temp, m, t, BLOCK: tl.constexpr, NP: tl.constexpr):
        """(count of values with key > t, their mass, count of values with key == t): one pass."""
        pivots = tl.where(tl.arange(0, NP) == 0, t - 1, t)  # [t - 1, t, t, ...]
        count, mass = _above(x_ptr, V, temp, m, pivots, True, True, BLOCK, NP)
        first = tl.arange(0, NP) == 0
        above_prev = tl.sum(tl.where(first, count, 0.0), 0)
        n_gt = tl.max(tl.where(first, 0.0, count), 0)
        return n_gt, tl.max(tl.where(first, 0.0, mass), 0), above_prev - n_gt

    @triton.jit
    def _sample_kernel(logits_ptr, stride_row, temps_ptr, top_k_ptr, top_p_ptr, u_ptr, out_ptr, stats_ptr, V,
                       greedy_below, BLOCK: tl.constexpr, NP: tl.constexpr):
        row = tl.program_id(0)
        x_ptr = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temps_ptr + row).to(tl.float32)
        greedy = temp < greedy_below
        temp = tl.where(greedy, 1.0, temp)
        # Pass 1: max (and the first index of it), min of the scaled values.
        m = -float("inf")
        mn = float("inf")
        arg = 0
        for v0 in range(0, V, BLOCK):
            s, key, ok, offs = _block(x_ptr, v0, V, temp, BLOCK)
            blk_max = tl.max(tl.where(ok, s, -float("inf")), 0)
            blk_arg = tl.min(tl.where(ok & (s == blk_max), offs, V), 0)
            arg = tl.where(blk_max > m, blk_arg, arg)
            m = tl.maximum(m, blk_max)
            mn = tl.minimum(mn, tl.min(tl.where(ok, s, float("inf")), 0))
        if greedy:
            tl.store(out_ptr + row, arg.to(tl.int64))
        else:
            key_max = _key(m)
            k = tl.load(top_k_ptr + row).to(tl.float32)
            p = tl.load(top_p_ptr + row).to(tl.float32)
            u = tl.load(u_ptr + row).to(tl.float32)
            # Top-k: the cutoff key, and how many values equal to it stay (the lowest indices).
            t_k = _key(mn).to(tl.int64)
            k_ties = V * 1.0
            if (k > 0) & (k < V):
                t_k, n_gt = _search(x_ptr, V, temp, m, t_k - 1, key_max, 0.0, k, False, True, BLOCK, NP)
                k_ties = k - n_gt
            n_gt, f_k, eq_k = _at(x_ptr, V, temp, m, t_k, BLOCK, NP)
            z_k = f_k + tl.minimum(k_ties, eq_k) * tl.exp(_value(t_k) - m)  # mass of the top-k set
            # Top-p within the top-k set: the smallest prefix (descending) whose mass reaches top_p.
            c = t_k
            ties = k_ties
            f_c = f_k
            eq_c = eq_k
            if p < 1.0:
                bound = p * z_k
                c, f_c = _search(x_ptr, V, temp, m, t_k - 1, key_max, 0.0, bound, True, True, BLOCK, NP)
                n_gt, f_c, eq_c = _at(x_ptr, V, temp, m, c, BLOCK, NP)  # f_c again, with eq_c in the same pass
                e_c = tl.exp(_value(c) - m)
                p_ties = tl.minimum(tl.where(e_c > 0, tl.ceil((bound - f_c) / e_c), V * 1.0), V * 1.0)
                ties = tl.where(c == t_k, tl.minimum(k_ties, p_ties), p_ties)
            ties = tl.minimum(tl.maximum(ties, 1.0), eq_c)  # the best token always stays
            e_c = tl.exp(_value(c) - m)
            kept = f_c + ties * e_c  # mass of the kept set
            target = u * kept
            # The draw, in descending order as the torch path's inverse CDF over its sorted probabilities.
            d, f_d = _search(x_ptr, V, temp, m, c - 1, key_max, 0.0, target, True, False, BLOCK, NP)
            e_d = tl.exp(_value(d) - m)
            j = tl.where(e_d > 0, tl.floor((target - f_d) / e_d), 0.0)
            j = tl.minimum(tl.maximum(j, 0.0), tl.where(d == c, ties, V * 1.0) - 1.0).to(tl.int32)
            # The j-th value (index order) equal to d, or the last one where rounding overshot the group.
            seen = 0
            found = -1
            last = 0
            for v0 in range(0, V, BLOCK):
                s, key, ok, offs = _block(x_ptr, v0, V, temp, BLOCK)
                eq = ok & (key == d)
                rank = seen + tl.cumsum(eq.to(tl.int32), 0) - 1
                found = tl.maximum(found, tl.max(tl.where(eq & (rank == j), offs, -1), 0))
                last = tl.maximum(last, tl.max(tl.where(eq, offs, -1), 0))
                seen += tl.sum(eq.to(tl.int32), 0)
            tl.store(out_ptr + row, tl.where(found >= 0, found, last).to(tl.int64))
            if stats_ptr is not None:
                tl.store(stats_ptr + row * 4 + 0, _value(c))  # the cutoff value (after temperature)
                tl.store(stats_ptr + row * 4 + 1, ties)  # values equal to it that stay
                tl.store(stats_ptr + row * 4 + 2, m)  # the row's max (after temperature)
                tl.store(stats_ptr + row * 4 + 3, kept)  # sum of exp(v - max) over the kept values


def sample_rows(logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                u: torch.Tensor, greedy_below: float, stats: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 (last dim contiguous); per row temps, top_k (0 = off), top_p, u in [0, 1) [B]
    -> token ids [B] int64: argmax where temps < greedy_below, else the torch path's draw (module doc).

    `stats` [B, 4] float32, if given, receives each sampling row's filter: the cutoff value v_c (after
    temperature), how many values equal to v_c stay (the lowest indices), the row's max m and the kept
    mass sum(exp(v - m)); the kept set is {v > v_c} plus those, each with probability exp(v - m) / mass.
    """
    bsz, vocab = logits.shape
    assert logits.stride(1) == 1
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz:
        _sample_kernel[(bsz,)](logits, logits.stride(0), temps, top_k, top_p, u, out, stats, vocab, greedy_below,
                               BLOCK=BLOCK, NP=NUM_PIVOTS)
    return out
