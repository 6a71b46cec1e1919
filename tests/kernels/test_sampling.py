"""The Triton sampling kernel against the torch sampler (server.engine.sampler.draw), under the interpreter.

The documented equivalence (server.kernels.sampling): for the same logits, parameters and uniform u,
the kernel keeps the same tokens with the same probabilities and draws the same token; the two
paths may differ only where a bound falls within float32 rounding of a boundary between tokens,
which none of these rows does. Greedy rows are exact. The random stream is the request's own and
is consumed identically on both paths (one uniform per sampling row and step).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.request import Request, Sampling
from server.engine.sampler import GREEDY_BELOW, draw, filtered_probs, sample
from server.kernels.sampling import BLOCK, sample_rows

NEG_INF = float("-inf")


def _kernel(logits, temps, top_k, top_p, u):
    """Kernel tokens [B] and filter stats [B, 4] for per-row parameter lists."""
    stats = torch.zeros(len(temps), 4)
    f32 = dict(dtype=torch.float32)
    tokens = sample_rows(logits, torch.tensor(temps, **f32), torch.tensor(top_k, **f32), torch.tensor(top_p, **f32),
                         torch.tensor(u, **f32), GREEDY_BELOW, stats)
    return tokens, stats


def _torch(logits, temps, top_k, top_p, u):
    return draw(logits, torch.tensor(temps), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(u))


def _torch_kept(row: torch.Tensor, temp: float, k: int, p: float) -> dict[int, float]:
    """{token: probability} of the torch path's filtered distribution (tokens of probability > 0), which
    its draw normalises by the kept mass (filtered_probs leaves top-p's survivors unnormalised)."""
    probs, order = filtered_probs(row[None], torch.tensor([temp]), torch.tensor([k]), torch.tensor([p]))
    probs = probs[0].double() / probs[0].double().sum()
    return {int(t): float(q) for t, q in zip(order[0], probs, strict=True) if q > 0}


def _kernel_kept(row: torch.Tensor, temp: float, stats: torch.Tensor) -> dict[int, float]:
    """The kernel's kept set and probabilities from its stats (cutoff value, ties kept, max, kept mass)."""
    cut, ties, m, mass = stats.tolist()
    s = (row / temp).clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
    keep = s > cut
    tied = (s == cut).nonzero().flatten()[:int(ties)]
    keep[tied] = True
    probs = torch.exp(s - m) / mass
    return {int(t): float(probs[t]) for t in keep.nonzero().flatten() if probs[t] > 0}


def _assert_same_distribution(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for t, q in want.items():
        assert abs(got[t] - q) <= 1e-6 + 1e-5 * q, (t, got[t], q)


def _rows(gen, v: int, kind: str) -> torch.Tensor:
    if kind == "ties":  # five levels only: tie groups at every cutoff
        return torch.randint(0, 5, (v,), generator=gen).float()
    if kind == "-inf":  # three finite logits among -inf ones (EOS masking, min_tokens)
        row = torch.full((v,), NEG_INF)
        row[torch.randperm(v, generator=gen)[:3]] = torch.tensor([1.0, 0.5, -2.0])
        return row
    return torch.randn(v, generator=gen) * 3


CASES = {  # name: (vocab, logits kind, temperature, top_k, top_p)
    "temperature only": (300, "randn", 0.8, 0, 1.0),
    "top_k only": (300, "randn", 1.0, 20, 1.0),
    "top_p only": (300, "randn", 1.0, 0, 0.9),
    "top_k then top_p": (300, "randn", 1.3, 50, 0.8),
    "top_k=1": (300, "ties", 1.0, 1, 1.0),
    "top_p tiny": (300, "randn", 1.0, 0, 1e-7),
    "top_p denormal, hot temperature": (300, "randn", 50.0, 0, 1e-45),
    "ties cut by top_k": (300, "ties", 1.0, 70, 1.0),
    "ties cut by top_p": (300, "ties", 0.7, 0, 0.5),
    "-inf logits, top_k past them": (300, "-inf", 1.0, 10, 1.0),
    "vocab not a multiple of the block": (2 * BLOCK + 37, "randn", 1.0, 40, 0.95),
}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_seeded_rows_keep_the_same_tokens_and_draw_the_same_token(name):
    v, kind, temp, k, p = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    row = _rows(gen, v, kind)
    us = [0.03, 0.41, 0.77, 0.98]
    logits = row.expand(len(us), v).contiguous()
    got, stats = _kernel(logits, [temp] * len(us), [k] * len(us), [p] * len(us), us)
    want = _torch(logits, [temp] * len(us), [k] * len(us), [p] * len(us), us)
    assert got.tolist() == want.tolist()
    want_kept = _torch_kept(row, temp, k, p)
    _assert_same_distribution(_kernel_kept(row, temp, stats[0]), want_kept)
    assert all(int(t) in want_kept for t in got)
    if k == 1 or p < 1e-6:  # only the best token, the first of equal ones
        assert set(want_kept) == {int(row.argmax())}


def test_greedy_rows_take_the_first_maximum_exactly():
    gen = torch.Generator().manual_seed(0)
    v = BLOCK + 37
    logits = torch.randn(4, v, generator=gen)
    logits[0, [5, BLOCK + 3]] = 10.0  # equal maxima in two blocks: the first index wins
    logits[1, [BLOCK + 1, BLOCK + 30]] = 10.0
    logits[2, 7] = NEG_INF
    temps = [0.0, 1e-7, 0.0, 1.0]  # the last row samples in the same launch
    got, _ = _kernel(logits, temps, [0, 5, 1, 0], [1.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.5])
    assert got[:3].tolist() == [5, BLOCK + 1, int(logits[2].argmax())]
    assert got.tolist() == _torch(logits, temps, [0, 5, 1, 0], [1.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.5]).tolist()


def test_draws_over_a_grid_of_u_follow_the_kept_distribution():
    """Inverse CDF: over u = (i + 0.5) / N each kept token takes a share of the grid within 1/N of its
    probability, and every draw equals the torch path's at the same u."""
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(200, generator=gen) * 2
    n = 32
    us = [(i + 0.5) / n for i in range(n)]
    logits = row.expand(n, 200).contiguous()
    got, _ = _kernel(logits, [0.9] * n, [6] * n, [0.9] * n, us)
    assert got.tolist() == _torch(logits, [0.9] * n, [6] * n, [0.9] * n, us).tolist()
    kept = _torch_kept(row, 0.9, 6, 0.9)
    assert 2 <= len(kept) <= 6
    for t, q in kept.items():
        assert abs(got.tolist().count(t) / n - q) <= 1 / n, (t, q)


def _request(temperature: float, seed: int, **kw) -> Request:
    return Request("r", prompt_ids=[0, 3, 5], sampling=Sampling(
        max_new_tokens=8, temperature=temperature, seed=seed, **kw), emit=lambda ev: None)


def test_sampler_kernel_path_matches_torch_path_and_consumes_the_same_random_stream():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=gen) * 2
    specs = [dict(temperature=0.0), dict(temperature=0.9, top_k=30), dict(temperature=1.2, top_p=0.8),
             dict(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3), dict(temperature=1.0, min_new_tokens=2)]
    runs = []
    for use_kernel in (False, True):
        reqs = [_request(seed=10 + i, **spec) for i, spec in enumerate(specs)]
        tokens, _ = sample(logits, reqs, eos_ids=[int(logits[4].argmax())], use_kernel=use_kernel)
        runs.append((tokens, [r.rng.random() for r in reqs]))
    assert runs[0] == runs[1]
    assert runs[0][0][4] != int(logits[4].argmax())  # EOS masked before min_new_tokens on both paths


V_SMALL = 16
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(row=st.lists(finite32, min_size=V_SMALL, max_size=V_SMALL),
       temperature=st.one_of(st.sampled_from([GREEDY_BELOW, 1.0, 3e38]), st.floats(GREEDY_BELOW, 3e38)),
       top_k=st.integers(0, V_SMALL + 2), top_p=st.one_of(st.sampled_from([1e-45, 0.5, 1.0]), st.floats(1e-45, 1.0)),
       u=st.floats(0.0, 0.999))
def test_extreme_parameters_give_the_torch_paths_kept_set(row, temperature, top_k, top_p, u):
    """Whatever the parameters (overflowing temperatures, denormal top_p, huge logits), the kernel's
    token is one the torch path keeps, and its kept set and probabilities are the torch path's."""
    logits = torch.tensor([row], dtype=torch.float32)
    got, stats = _kernel(logits, [temperature], [top_k], [top_p], [u])
    want_kept = _torch_kept(logits[0], temperature, top_k, top_p)
    assert int(got[0]) in want_kept
    _assert_same_distribution(_kernel_kept(logits[0], temperature, stats[0]), want_kept)
