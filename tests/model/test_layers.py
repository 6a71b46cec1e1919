"""The forward's building blocks against transformers' own, bit for bit, and the paged cache's
isolation slots (a faster op that rounded differently would break --matmul blas's exactness)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from server.model.attention import rotary_tables, rotate
from server.model.llama import PagedKVCache, StepInput, rms_norm
from server.model.loader import load_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (16, 1, 576), (3, 37, 64)])
def test_rms_norm_is_transformers_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(0)
    ref = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape[-1], generator=g))
    for scale in (1e-3, 1.0, 1e3):
        x = (torch.randn(shape, generator=g) * scale).to(dtype)
        with torch.no_grad():
            assert torch.equal(rms_norm(x, ref.weight, 1e-5), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_folded_signs_is_transformers_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    bsz, seq, heads, kv_heads, dim = 3, 5, 4, 2, 64
    cos, sin_rot = rotary_tables(dim, 10000.0, 64, "cpu", dtype)
    half = dim // 2
    sin = torch.cat((-sin_rot[:, :half], sin_rot[:, half:]), dim=-1)
    positions = torch.randint(0, 64, (bsz, seq), generator=g)
    q = torch.randn(bsz, seq, heads, dim, generator=g).to(dtype)
    k = torch.randn(bsz, seq, kv_heads, dim, generator=g).to(dtype)
    ours = rotate(torch.cat([q, k], dim=2), cos[positions][:, :, None], sin_rot[positions][:, :, None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[positions], sin[positions])
    assert torch.equal(ours[:, :, :heads], ref_q.transpose(1, 2))
    assert torch.equal(ours[:, :, heads:], ref_k.transpose(1, 2))


def test_padded_prefill_never_writes_the_null_slot(tiny_llama):
    """Padding positions of a chunk go to the scratch slot: the null slot, which every position a row does
    not own reads, stays zero, so masked values stay exactly 0 whatever the pages held."""
    model = load_model(str(tiny_llama))
    cache = PagedKVCache(model.args, num_pages=8, page_size=4, dtype=torch.float32, device="cpu")
    step = StepInput(start=torch.tensor([0, 0]), lengths=torch.tensor([7, 2]),
                     block_tables=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]),
                     input_ids=torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0)))
    model.runtime.forward(step, cache)
    for layer in range(model.args.num_layers):
        assert not cache.k[layer][cache.null_slot].any() and not cache.v[layer][cache.null_slot].any()
        assert cache.k[layer][cache.scratch_slot].any()  # the padding went there
