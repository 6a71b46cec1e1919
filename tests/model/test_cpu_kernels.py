"""Our CPU decode kernels (server/kernels/cpu/decode.cpp via server.model.cpu_decode) against the torch path.

Each op within onednn mode's tolerance of the torch ops it replaces, on odd shapes, scattered pages and
rows of different lengths; the attention never reads an entry its row does not own (NaN-poisoned pages);
the runtime takes them at decode steps in --matmul onednn, float32 or bfloat16 (where oneDNN runs bf16), and
serves on the torch path when the extension cannot be built. In bfloat16 each op rounds where the torch path
rounds, so it stays within one bf16 step of it. The extension is compiled once per machine and cached (first run ~40 s).
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from server.kernels.cpu import loader
from server.model import cpu_decode
from server.model.cpu_features import detect
from server.model.llama import PagedKVCache, StepInput, TorchOps, rms_norm, silu_mul
from server.model.loader import load_model

from .test_equivalence import TOLERANCE, _prefill_and_decode, _reference


@pytest.fixture(scope="module")
def kern():
    module = cpu_decode.kernels()
    assert module is not None, "the CPU kernels must build here (g++ and ninja are part of the dev setup)"
    return module


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("out_features,in_features", [(13, 37), (960, 576), (8, 8), (131, 1536)])
def test_gemv_matches_linear(kern, rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 1, in_features, generator=g)  # [R, 1, in] as a decode step's projection input
    tol = 1e-5 * in_features ** 0.5
    torch.testing.assert_close(kern.gemv(x, w, None), F.linear(x, w), atol=tol, rtol=1e-5)
    torch.testing.assert_close(kern.gemv(x, w, b), F.linear(x, w, b), atol=tol, rtol=1e-5)


def test_gemv_refuses_more_than_sixteen_rows(kern):
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        kern.gemv(torch.randn(17, 8), torch.randn(3, 8), None)


@pytest.mark.parametrize("shape", [(1, 1, 576), (7, 1, 37), (64, 1, 64)])
@pytest.mark.parametrize("per_row", [False, True])
def test_add_rms_norm_matches_torch(kern, shape, per_row):
    g = torch.Generator().manual_seed(shape[0])
    x, delta = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 3
    weight = torch.randn(shape if per_row else shape[-1:], generator=g)  # [H] or per row [B, 1, H]
    total, normed = kern.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, rms_norm(x + delta, weight, 1e-5), atol=1e-5, rtol=1e-5)
    same, normed = kern.add_rms_norm(x, None, weight, 1e-5)
    assert torch.equal(same, x)
    torch.testing.assert_close(normed, rms_norm(x, weight, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 3072), (5, 1, 74)])
def test_silu_mul_matches_torch(kern, shape):
    gate_up = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(kern.silu_mul(gate_up), silu_mul(gate_up), atol=1e-6, rtol=1e-5)


def _decode_setup(model, lengths: list[int], page_size: int, seed: int, dtype: torch.dtype = torch.float32):
    """A cache with random entries, rows of `lengths` entries already written on scattered pages, and
    the decode step adding one token to each row."""
    g = torch.Generator().manual_seed(seed)
    pages_per_row = max(lengths) // page_size + 1
    num_pages = len(lengths) * pages_per_row + 3  # spare pages nobody owns
    cache = PagedKVCache(model.args, num_pages, page_size, dtype, "cpu")
    for c in cache.k + cache.v:
        c.normal_(generator=g)
    tables = torch.randperm(num_pages, generator=g)[:len(lengths) * pages_per_row].view(len(lengths), -1)
    step = StepInput(start=torch.tensor(lengths), lengths=torch.ones(len(lengths), dtype=torch.long),
                     block_tables=tables, input_ids=torch.randint(0, model.args.vocab_size, (len(lengths), 1)))
    return cache, step


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])  # GQA 4:2, 4:1; q/k/v bias
@pytest.mark.parametrize("lengths,page_size", [([9], 4), ([0, 5, 17, 3], 4), ([30, 1, 64], 16)])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: scores spread over hundreds, softmax far into exp's tails
def test_rope_kv_write_attention_match_torch_ops(kern, tiny_model_factory, arch, lengths, page_size, scale):
    model = load_model(str(tiny_model_factory(arch)))
    rt, a = model.runtime, model.args
    cache, step = _decode_setup(model, lengths, page_size, seed=len(lengths))
    ref_cache = copy.deepcopy(cache)
    qkv = torch.randn(len(lengths), 1, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim) * scale
    ours = cpu_decode.CpuKernelOps(rt, step, cache).attention(1, qkv)  # [B, 1, H*D]
    ref = TorchOps(rt, step, ref_cache).attention(1, qkv)
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=1e-5)
    for mine, theirs in zip(cache.k + cache.v, ref_cache.k + ref_cache.v, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)  # the same entries written, same values


def test_attention_never_reads_entries_a_row_does_not_own(kern, tiny_model_factory):
    model = load_model(str(tiny_model_factory("llama")))
    lengths, page_size = [6, 1, 13], 4
    cache, step = _decode_setup(model, lengths, page_size, seed=3)
    clean = copy.deepcopy(cache)
    owned = torch.zeros(cache.k[0].shape[0], dtype=torch.bool)
    for row, n in enumerate(lengths):
        for t in range(n):  # entries written before this step; the new one is written by the op itself
            owned[step.block_tables[row, t // page_size] * page_size + t % page_size] = True
    for c in cache.k + cache.v:
        c[~owned] = float("nan")  # other rows' pages, the rest of each row's own pages, spare pages
    a = model.args
    qkv = torch.randn(len(lengths), 1, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim)
    poisoned = cpu_decode.CpuKernelOps(model.runtime, step, cache).attention(0, qkv)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, cpu_decode.CpuKernelOps(model.runtime, step, clean).attention(0, qkv),
                               atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_step_logits_match_the_torch_path(kern, tiny_model_factory, arch, monkeypatch):
    model = load_model(str(tiny_model_factory(arch)))
    rt = model.runtime
    assert rt.use_cpu_kernels
    cache, step = _decode_setup(model, [3, 11, 7], page_size=4, seed=1)
    ref_cache = copy.deepcopy(cache)
    ours = rt.forward(step, cache)
    monkeypatch.setattr(cpu_decode, "FUSED_OPS", False)
    monkeypatch.setattr(cpu_decode, "GEMV_ROWS", 0)
    ref = rt.forward(step, ref_cache)
    torch.testing.assert_close(ours, ref, atol=TOLERANCE["onednn"], rtol=0)


def test_only_the_default_mode_takes_the_kernels(kern, tiny_model_factory):
    folder = str(tiny_model_factory("llama"))
    assert load_model(folder, matmul="onednn").runtime.use_cpu_kernels
    assert not load_model(folder, matmul="blas").runtime.use_cpu_kernels  # the exact mode keeps F.linear
    # bf16 where oneDNN runs bf16 (AVX-512 / AVX-NE-CONVERT): elsewhere the bf16 mode is torch's generic path
    assert load_model(folder, dtype="bfloat16").runtime.use_cpu_kernels == detect().onednn_bf16
    assert not load_model(folder, dtype="bfloat16", matmul="blas").runtime.use_cpu_kernels


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    old = stale.stat().st_mtime - loader.STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    loader._clear_stale_lock(stale)  # left by a build that was killed: later builds would wait forever
    loader._clear_stale_lock(fresh)  # another process is building right now
    loader._clear_stale_lock(tmp_path / "absent")
    assert not stale.exists() and fresh.exists()


def test_build_failure_logs_once_and_the_runtime_serves_on_the_torch_path(tiny_model_factory, monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken(**_):
        raise RuntimeError("simulated: no compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.setattr(loader, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="adapterserve.model"):
        assert loader.load_decode_kernels() is None
        assert loader.load_decode_kernels() is None  # remembered: one warning, not one per call
    warnings = [r for r in caplog.records if "CPU decode kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()

    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.setenv("ADAPTERSERVE_CPU_KERNELS", "0")  # switched off by the operator: the same fallback
    assert loader.load_decode_kernels() is None

    monkeypatch.setattr(cpu_decode, "_kernels", None)  # as after a failed build at start
    monkeypatch.setattr(cpu_decode, "_tried", True)
    folder = tiny_model_factory("llama")
    model = load_model(str(folder))
    assert model.runtime.use_onednn and not model.runtime.use_cpu_kernels
    ids = [1, 5, 9, 2, 7]
    logits, tokens = _prefill_and_decode(model, ids, 6)
    ref_logits, ref_tokens = _reference(folder, ids, 6)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=TOLERANCE["onednn"], rtol=0)


# ---------------------------------------------------------------- bfloat16
BF16_STEP = 2.0 ** -7  # one bf16 rounding, relative (8 significant bits)


def _close_bf16(ours: torch.Tensor, ref: torch.Tensor, steps: float = 1.0, atol: float = 1e-6) -> None:
    """bf16 tensors within `steps` bf16 roundings of each other, relative to the larger magnitude."""
    assert ours.dtype == ref.dtype == torch.bfloat16
    a, b = ours.double(), ref.double()
    bound = steps * BF16_STEP * torch.maximum(a.abs(), b.abs()) + atol
    assert ((a - b).abs() <= bound).all(), f"max excess {((a - b).abs() - bound).max().item():.3g}"


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("out_features,in_features", [(13, 37), (960, 576), (131, 1536)])
def test_gemv_bf16_matches_linear(kern, rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16()
    exact = x.double() @ w.double().t() + b.double()  # [rows, out]
    ours = kern.gemv(x, w, b)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out_features)
    # float32 sums of exact bf16 products, rounded once: within one bf16 rounding of the exact value
    _close_bf16(ours, exact.bfloat16(), steps=1.0, atol=1e-5)
    _close_bf16(ours, F.linear(x, w, b), steps=1.0, atol=1e-5)  # torch's bf16 linear rounds once too


def test_kernels_refuse_mixed_dtypes(kern):
    with pytest.raises(RuntimeError, match="dtype"):
        kern.gemv(torch.randn(1, 8), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kern.gemv(torch.randn(1, 8).half(), torch.randn(4, 8).half(), None)


@pytest.mark.parametrize("shape", [(1, 1, 576), (7, 1, 37), (64, 1, 64)])
@pytest.mark.parametrize("per_row", [False, True])
def test_add_rms_norm_bf16_matches_torch(kern, shape, per_row):
    g = torch.Generator().manual_seed(shape[0])
    x, delta = (torch.randn(*shape, generator=g).bfloat16() for _ in range(2))
    weight = torch.randn(*(shape if per_row else shape[-1:]), generator=g).bfloat16()
    total, normed = kern.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)  # the residual stream rounds exactly as the torch path's sum
    _close_bf16(normed, rms_norm(x + delta, weight, 1e-5))


@pytest.mark.parametrize("shape", [(1, 1, 3072), (5, 1, 74)])
def test_silu_mul_bf16_matches_torch(kern, shape):
    gate_up = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 4).bfloat16()
    _close_bf16(kern.silu_mul(gate_up), silu_mul(gate_up))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary of x [..., D] in float64: x * cos + rotate_half(x) * sin (sin plain, as rt.sin)."""
    d = x.shape[-1]
    return x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1) * sin


def _exact_attention(rt, qkv, k_cache, v_cache, step, page_size) -> torch.Tensor:
    """float64 attention of each row's query (rotated exactly, rounded to qkv's dtype once) over its stored
    entries 0..start[b] -> [B, 1, H*D] in qkv's dtype."""
    a = rt.args
    h, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
    out = []
    for b, pos in enumerate(step.start.tolist()):
        q = _rotate(qkv[b, 0, :h * d].double().view(h, d), rt.cos[pos].double(), rt.sin[pos].double())
        q = q.to(qkv.dtype).double()  # [H, D]
        slots = torch.tensor([step.block_tables[b, t // page_size] * page_size + t % page_size
                              for t in range(pos + 1)])
        k = k_cache[slots].double().repeat_interleave(h // hkv, dim=1)  # [T, H, D]
        v = v_cache[slots].double().repeat_interleave(h // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q, k) / d ** 0.5, dim=-1)  # [H, T]
        out.append(torch.einsum("ht,thd->hd", p, v).reshape(1, h * d))
    return torch.stack(out).to(qkv.dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lengths,page_size", [([9], 4), ([0, 5, 17, 3], 4), ([30, 1, 64], 16)])
def test_rope_kv_write_attention_bf16_match_torch_ops(kern, tiny_model_factory, arch, lengths, page_size):
    model = load_model(str(tiny_model_factory(arch)), dtype="bfloat16")
    rt, a = model.runtime, model.args
    cache, step = _decode_setup(model, lengths, page_size, seed=len(lengths), dtype=torch.bfloat16)
    ref_cache = copy.deepcopy(cache)
    qkv = torch.randn(len(lengths), 1, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim).bfloat16()
    ours = cpu_decode.CpuKernelOps(rt, step, cache).attention(1, qkv)  # [B, 1, H*D] bf16
    ref = TorchOps(rt, step, ref_cache).attention(1, qkv)
    # Against float64 attention over what our kernel stored (its K entries are checked below) with the query
    # rotated exactly and rounded once: ours within a bf16 step of it; the torch path (q, k rounded per op)
    # within a few.
    exact = _exact_attention(rt, qkv, cache.k[1], cache.v[1], step, page_size)
    _close_bf16(ours, exact, steps=1.0, atol=1e-3)
    _close_bf16(ref, exact, steps=4.0, atol=1e-2)
    # The new entries: ours is the exact rotary of the bf16 inputs rounded once (the torch path rounds each
    # of its three ops, so it is compared with the exact value, not with ours); v copied as is.
    h, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
    for b, pos in enumerate(lengths):
        slot = step.block_tables[b, pos // page_size] * page_size + pos % page_size
        k_raw = qkv[b, 0, h * d:(h + hkv) * d].double().view(hkv, d)
        rotated = _rotate(k_raw, rt.cos[pos].double(), rt.sin[pos].double())
        _close_bf16(cache.k[1][slot], rotated.bfloat16())
        _close_bf16(ref_cache.k[1][slot], rotated.bfloat16(), steps=3.0, atol=BF16_STEP * k_raw.abs().max().item())
        assert torch.equal(cache.v[1][slot], qkv[b, 0, (h + hkv) * d:].view(hkv, d))
    for layer in (0,):  # other layers untouched
        assert torch.equal(cache.k[layer], ref_cache.k[layer]) and torch.equal(cache.v[layer], ref_cache.v[layer])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_step_logits_bf16_no_farther_from_float32_than_the_torch_path(kern, tiny_model_factory, arch,
                                                                          monkeypatch):
    """bfloat16 mode's decode step (our kernels where oneDNN runs bf16, the torch path elsewhere) against the
    float32 model on the same cache: at most as far as torch's bf16 path (+ a little), never more."""
    folder = str(tiny_model_factory(arch))
    model = load_model(folder, dtype="bfloat16")
    rt = model.runtime
    cache, step = _decode_setup(model, [3, 11, 7], page_size=4, seed=1, dtype=torch.bfloat16)
    f32 = load_model(folder, matmul="blas").runtime
    f32_cache = PagedKVCache(model.args, cache.k[0].shape[0] // 4, 4, torch.float32, "cpu")
    for dst, src in zip(f32_cache.k + f32_cache.v, cache.k + cache.v, strict=True):
        dst.copy_(src.float())
    exact = f32.forward(step, f32_cache)  # [B, V] float32
    ref_cache = copy.deepcopy(cache)
    ours = rt.forward(step, cache)
    monkeypatch.setattr(cpu_decode, "FUSED_OPS", False)
    monkeypatch.setattr(cpu_decode, "GEMV_ROWS_BF16", 0)
    ref = rt.forward(step, ref_cache)
    ours_err, ref_err = (ours - exact).abs().max().item(), (ref - exact).abs().max().item()
    assert ours_err <= 1.5 * ref_err + 1e-3, (ours_err, ref_err)
