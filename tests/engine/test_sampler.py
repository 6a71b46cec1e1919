"""Sampler edge cases: tiny temperatures are greedy, and no parameter combination yields NaN."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.request import Request, Sampling
from server.engine.sampler import GREEDY_BELOW, filtered_probs, sample

V = 16
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
logit_rows = st.lists(finite32, min_size=V, max_size=V)
temperatures = st.one_of(st.sampled_from([1e-45, 1e-37, 1e-6, GREEDY_BELOW, 1.0, 3e38]),
                         st.floats(min_value=GREEDY_BELOW, max_value=3e38))
top_ps = st.one_of(st.sampled_from([1e-45, 1e-7, 0.5, 1.0]), st.floats(min_value=1e-45, max_value=1.0))
penalties = st.one_of(st.sampled_from([1e-45, 1e-30, 1.0, 1e30, 3e38]),
                      st.floats(min_value=1e-45, max_value=3e38))


def request(temperature: float, top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0, seed: int = 0,
            seen: list[int] | None = None) -> Request:
    r = Request("r", prompt_ids=seen or [0, 3, 5], sampling=Sampling(
        max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed,
        logprobs=True, top_logprobs=2), emit=lambda ev: None)
    return r


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rows=st.lists(logit_rows, min_size=1, max_size=3), temperature=temperatures, top_k=st.integers(0, V + 2),
       top_p=top_ps)
def test_filtered_probs_are_never_nan(rows, temperature, top_k, top_p):
    logits = torch.tensor(rows, dtype=torch.float32)  # [b, V]
    b = logits.shape[0]
    probs, order = filtered_probs(logits, torch.full((b,), temperature), torch.full((b,), top_k),
                                  torch.full((b,), top_p))
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert (probs.sum(-1) > 0).all() and (probs[:, 0] > 0).all()  # the best token always survives
    assert torch.equal(order.sort(-1).values, torch.arange(V).expand(b, V))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(row=logit_rows, temperature=st.one_of(temperatures, st.sampled_from([0.0, 1e-37])), top_k=st.integers(0, V),
       top_p=top_ps, penalty=penalties, seed=st.integers(0, 2**32))
def test_sample_picks_a_valid_token_whatever_the_parameters(row, temperature, top_k, top_p, penalty, seed):
    logits = torch.tensor([row], dtype=torch.float32)
    r = request(temperature, top_k, top_p, penalty, seed)
    tokens, info = sample(logits, [r])
    assert 0 <= tokens[0] < V
    assert not math.isnan(info[0].logprob) and all(not math.isnan(v) for _, v in info[0].top)
    if top_k == 1 or temperature < GREEDY_BELOW:  # deterministic: the best token after the penalty
        again, _ = sample(logits, [request(temperature, top_k, top_p, penalty, seed + 1)])
        assert again == tokens


def test_tiny_temperatures_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 5
    greedy = logits.argmax(-1).tolist()
    for t in (0.0, 1e-45, 1e-37, 1e-20, GREEDY_BELOW / 2):
        tokens, _ = sample(logits, [request(t, seed=s) for s in range(4)])
        assert tokens == greedy, t
    # at and above the threshold the rows sample (a flat distribution picks more than one token)
    flat = torch.zeros(64, V)
    tokens, _ = sample(flat, [request(GREEDY_BELOW * 10, seed=s) for s in range(64)])
    assert len(set(tokens)) > 1


def test_min_new_tokens_masks_eos_until_reached_and_logprobs_stay_raw():
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0  # EOS is every row's best token
    logits[:, 2] = 4.0
    early, done = request(0.0), request(0.0)
    early.sampling.min_new_tokens = done.sampling.min_new_tokens = 2
    early.output_ids, done.output_ids = [1], [1, 1]  # one token short of the minimum / reached it
    tokens, info = sample(logits, [early, done], eos_ids=(7,))
    assert tokens == [2, 7]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert math.isclose(info[0].logprob, raw[2].item(), rel_tol=1e-6)  # the model's distribution, not the mask's
    assert info[0].top[0][0] == 7
