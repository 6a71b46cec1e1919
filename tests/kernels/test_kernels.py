"""Every Triton kernel against its torch reference, on CPU tensors under TRITON_INTERPRET=1.

Interpreter caveat: its float32 -> bfloat16 cast truncates instead of rounding to nearest, so
bfloat16 results may differ from torch's by one bfloat16 ulp; float32 ones match to ~1e-6.
"""

from __future__ import annotations

import pytest
import torch

from server.kernels import lora, norm, paged_attention, rope

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


# ----------------------------------------------------------------------------- LoRA
LORA_ROWS = {  # token slots: layouts the engine produces and ones it must survive
    "one adapter": [2, 2, 2, 2, 2],
    "sorted, even": [0, 0, 1, 1, 2, 2],
    "base rows and gaps": [-1, 3, -1, 0, 0, 3],
    "unsorted, uneven": [1, 0, 3, 1, 1, 0, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1],  # > BLOCK_M rows of slot 3
    "single base row": [-1],
    "decode, one row per slot": [0, 1, 2, 3],
}


@pytest.mark.parametrize("rows", LORA_ROWS, ids=list(LORA_ROWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sort_tokens_groups_each_slot(rows, dtype):
    ts = torch.tensor(LORA_ROWS[rows])
    got = lora.sort_tokens(ts, 4)
    for slot in range(4):
        start, count = int(got.starts[slot]), int(got.counts[slot])
        assert sorted(got.order[start:start + count].tolist()) == [i for i, s in enumerate(ts.tolist()) if s == slot]


SHAPES = {"qkv r8": (8, [48, 16, 16]), "gate_up r16": (16, [40, 72]), "o r1": (1, [24]), "down r64 wide": (64, [130])}
CASES = [(rows, "qkv r8") for rows in LORA_ROWS] + [("unsorted, uneven", s) for s in SHAPES if s != "qkv r8"]


@pytest.mark.parametrize("rows, shape", CASES, ids=[f"{r}-{s}" for r, s in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_shrink_expand_match_reference(rows, shape, dtype):
    rank, widths = SHAPES[shape]
    gen = torch.Generator().manual_seed(len(rows) + rank)
    slots, d = 4, 40
    ts = torch.tensor(LORA_ROWS[rows])
    at = torch.randn(slots, d, len(widths) * rank, generator=gen).to(dtype)
    bts = [torch.randn(slots, rank, w, generator=gen).to(dtype) for w in widths]
    columns, c = [], 0
    for w in widths:
        columns.append((c, c + w))
        c += w
    x = torch.randn(len(ts), d, generator=gen).to(dtype)
    tokens = lora.sort_tokens(ts, slots)
    shrunk = lora.shrink(x, at, tokens)
    _close(shrunk, lora.shrink_reference(x, at, ts), torch.float32 if dtype == torch.float32 else dtype)
    out = torch.randn(len(ts), c, generator=gen).to(dtype)
    want = out.clone()
    lora.expand(shrunk, bts, columns, out, tokens)
    lora.expand_reference(shrunk, bts, columns, want, ts)
    if dtype == torch.float32:
        # Sums of `rank` products in another order than the reference's BLAS (whose kernels differ between
        # CPUs: AVX-512 hosts sum in wider blocks): float32 rounding grows with sqrt(rank) x the products' size.
        scale = shrunk.abs().max().item() * max(b.abs().max().item() for b in bts)
        atol = max(TOL[dtype]["atol"], 2 * rank ** 0.5 * torch.finfo(torch.float32).eps * scale)
        torch.testing.assert_close(out, want, rtol=TOL[dtype]["rtol"], atol=atol)
    else:
        _close(out, want, dtype)
    base = ts < 0
    assert torch.equal(shrunk[base], torch.zeros_like(shrunk[base]))  # rows of no adapter get nothing


# ----------------------------------------------------------------------------- paged attention
ATTENTION_CASES = {  # (page size, new tokens per row, cache start per row, heads, kv heads)
    "decode, page 16": (16, [1, 1, 1], [0, 17, 40], 4, 2),
    "decode, page 1, MHA": (1, [1, 1], [5, 0], 2, 2),
    "decode, GQA 8:1": (4, [1, 1, 1, 1], [3, 9, 30, 0], 8, 1),
    "prefill, ragged": (4, [7, 3, 1], [0, 0, 0], 4, 2),
    "prefill after a cached prefix": (3, [5, 2], [6, 11], 4, 2),
    "padding row (length 0)": (4, [2, 0, 1], [0, 3, 8], 4, 2),
}


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=list(ATTENTION_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_matches_reference(case, dtype):
    page, lengths, starts, heads, kv_heads = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(page + len(lengths))
    d, num_pages, bsz, seq = 16, 48, len(lengths), max(lengths)
    k_cache = torch.randn(num_pages * page, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages * page, kv_heads, d, generator=gen).to(dtype)
    need = max(s + n for s, n in zip(starts, lengths, strict=True)) // page + 1
    tables = torch.stack([torch.randperm(num_pages, generator=gen)[:need] for _ in range(bsz)])  # scattered pages
    q = torch.randn(bsz, seq, heads, d, generator=gen).to(dtype)
    start, length = torch.tensor(starts), torch.tensor(lengths)
    got = paged_attention.paged_attention(q, k_cache, v_cache, tables, start, length, page)
    want = paged_attention.paged_attention_reference(q, k_cache, v_cache, tables, start, length.clamp_min(1), page)
    valid = torch.arange(seq)[None, :] < length[:, None]  # [B, S]
    _close(got[valid], want[valid], dtype)


# ----------------------------------------------------------------------------- norm and rope
@pytest.mark.parametrize("hidden", [64, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_fused_residual_match_reference(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    x, delta = (torch.randn(3, 5, hidden, generator=gen).to(dtype) for _ in range(2))
    w = torch.randn(hidden, generator=gen).to(dtype)
    _close(norm.rms_norm(x, w, 1e-5), norm.rms_norm_reference(x, w, 1e-5), dtype)
    total, normed = norm.add_rms_norm(x, delta, w, 1e-6)
    want_total, want_normed = norm.add_rms_norm_reference(x, delta, w, 1e-6)
    _close(total, want_total, dtype)
    _close(normed, want_normed, dtype)


@pytest.mark.parametrize("page, lengths, starts", [(4, [5, 2, 0], [0, 3, 10]), (16, [1, 1], [7, 30]), (1, [3], [2])],
                         ids=["prefill + padding row", "decode", "page 1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_and_kv_write_match_reference(page, lengths, starts, dtype):
    gen = torch.Generator().manual_seed(page)
    heads, kv_heads, d, num_pages = 4, 2, 16, 40
    bsz, seq = len(lengths), max(lengths)
    qkv = torch.randn(bsz, seq, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(64).float(), inv).repeat(1, 2)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    tables = torch.stack([torch.randperm(num_pages, generator=gen)[:40 // page + 1] for _ in range(bsz)])
    start, length = torch.tensor(starts), torch.tensor(lengths)
    caches = [torch.zeros(num_pages * page, kv_heads, d, dtype=dtype) for _ in range(4)]
    q = rope.rope_write_kv(qkv, cos, sin, start, length, tables, caches[0], caches[1], page, heads)
    want_q = rope.rope_write_kv_reference(qkv, cos, sin, start, length, tables, caches[2], caches[3], page, heads)
    _close(q, want_q, dtype)
    _close(caches[0], caches[2], dtype)  # same slots written, nothing else touched
    torch.testing.assert_close(caches[1], caches[3])  # v is copied, not computed
