"""Our CPU decode kernels (server/kernels/cpu/decode.cpp via server.model.cpu_decode) against the torch path.

Each op within onednn mode's tolerance of the torch ops it replaces, on odd shapes, scattered pages and
rows of different lengths; the attention never reads an entry its row does not own (NaN-poisoned pages);
the runtime takes them at decode steps in --matmul onednn float32 only, and serves on the torch path when
the extension cannot be built. The extension is compiled once per machine and cached (first run ~40 s).
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


def _decode_setup(model, lengths: list[int], page_size: int, seed: int):
    """A cache with random entries, rows of `lengths` entries already written on scattered pages, and
    the decode step adding one token to each row."""
    g = torch.Generator().manual_seed(seed)
    pages_per_row = max(lengths) // page_size + 1
    num_pages = len(lengths) * pages_per_row + 3  # spare pages nobody owns
    cache = PagedKVCache(model.args, num_pages, page_size, torch.float32, "cpu")
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


def test_only_the_default_mode_in_float32_takes_the_kernels(kern, tiny_model_factory):
    folder = str(tiny_model_factory("llama"))
    assert load_model(folder, matmul="onednn").runtime.use_cpu_kernels
    assert not load_model(folder, matmul="blas").runtime.use_cpu_kernels  # the exact mode keeps F.linear
    assert not load_model(folder, dtype="bfloat16").runtime.use_cpu_kernels


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
