"""Vectorized per-row sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Each row draws exactly one uniform number per step from its own seeded generator and picks
the token by inverse CDF over its own filtered distribution (descending order, ties by token index),
so a seeded request samples the same tokens whatever else shares the batch. Logprobs are those of
the model's raw distribution. :func:`draw` is that math in torch (the CPU path); with the Triton
kernels on (``--kernels triton``, or ``auto`` on CUDA) server.kernels.sampling computes the same
draw without sorting the vocabulary, from the same uniform numbers: same kept tokens, same
probabilities, and the same token except where the draw falls within float32 rounding of the
boundary between two tokens (tests/kernels/test_sampling.py).

Temperatures below :data:`GREEDY_BELOW` (1e-5, as vLLM's ``_SAMPLING_EPS``) are greedy: dividing
logits by 1e-37 overflows float32 to inf and softmax turns inf into NaN. Scaled logits are also
clamped to float32's finite range, so no temperature / top_k / top_p / repetition_penalty
combination yields a NaN probability from finite logits (tests/engine/test_sampler.py checks it
property-based). Non-finite logits from the model are the engine's concern, not this module's.

Thread: the engine thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.request import Request, TokenLogprob

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
_FINITE = torch.finfo(torch.float32).max


def _apply_repetition_penalty(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows = [i for i, r in enumerate(requests) if r.sampling.repetition_penalty != 1.0]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:  # one vectorized gather/scatter per penalized row
        r = requests[i]
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long, device=logits.device)
        vals = logits[i, seen]
        p = r.sampling.repetition_penalty
        logits[i, seen] = torch.where(vals > 0, vals / p, vals * p)
    return logits


def filtered_probs(logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling rows' logits [b, V] -> (probabilities in descending-logit order [b, V], that order [b, V]).

    Temperature scaling, then top-k (0 = off), then top-p (the smallest prefix whose mass reaches
    top_p; the best token always stays). Finite logits give finite probabilities summing to 1.
    """
    sub = (logits / temps[:, None]).clamp(-_FINITE, _FINITE)  # [b, V], never inf
    sorted_logits, order = sub.sort(dim=-1, descending=True, stable=True)  # [b, V], ties by token index
    ranks = torch.arange(sub.shape[-1], device=sub.device)[None, :]
    drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    probs = probs.masked_fill((before >= top_p[:, None]) & (ranks > 0), 0.0)
    return probs, order


def _mask_early_eos(logits: torch.Tensor, requests: list[Request], eos_ids: Sequence[int]) -> torch.Tensor:
    """EOS ids get -inf in rows that have not reached their min_new_tokens yet (a copy; logprobs stay raw)."""
    rows = [i for i, r in enumerate(requests) if len(r.output_ids) < r.sampling.min_new_tokens]
    if not rows or not eos_ids:
        return logits
    out = logits.clone()
    rows_t = torch.tensor(rows, device=logits.device)[:, None]  # [m, 1]
    out[rows_t, torch.tensor(sorted(eos_ids), device=logits.device)[None, :]] = float("-inf")
    return out


def draw(logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         u: torch.Tensor) -> torch.Tensor:
    """The torch draw: logits [b, V] float32, per row temps, top_k, top_p and a uniform u in [0, 1) [b]
    -> token ids [b]: argmax where temps < GREEDY_BELOW, else inverse CDF at u over filtered_probs."""
    greedy = temps < GREEDY_BELOW
    probs, order = filtered_probs(logits, torch.where(greedy, 1.0, temps), top_k, top_p)
    cdf = probs.cumsum(dim=-1)  # [b, V]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(cdf.shape[-1] - 1)
    return torch.where(greedy, logits.argmax(dim=-1), order.gather(1, pick).squeeze(1))


def sample(logits: torch.Tensor, requests: list[Request], eos_ids: Sequence[int] = (),
           use_kernel: bool = False) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] float32 -> chosen token per row, and logprob info for rows that asked for it.

    `eos_ids` are masked out of rows that have not generated their ``min_new_tokens`` yet. `use_kernel`:
    draw with server.kernels.sampling (one launch, no sort) instead of :func:`draw`.
    """
    bsz = logits.shape[0]
    dev = logits.device
    processed = _mask_early_eos(_apply_repetition_penalty(logits, requests), requests, eos_ids)
    rows = [i for i, r in enumerate(requests) if r.sampling.temperature >= GREEDY_BELOW]  # decided on the host
    u = [requests[i].rng.random() for i in rows]  # one uniform per sampling row and step, on either path
    if not rows:
        chosen = processed.argmax(dim=-1)  # [B]
    elif use_kernel:
        from server.kernels.sampling import sample_rows

        vocab = processed.shape[-1]
        params = [[0.0] * bsz for _ in range(4)]  # temps, top_k, top_p, u: one host-to-device copy
        for i, r in enumerate(requests):
            s = r.sampling
            params[1][i], params[2][i] = min(s.top_k, vocab), s.top_p
        for i, x in zip(rows, u, strict=True):  # greedy rows keep temperature 0
            params[0][i], params[3][i] = requests[i].sampling.temperature, x
        p = torch.tensor(params, dtype=torch.float32).to(dev, non_blocking=True)  # [4, B]
        chosen = sample_rows(processed, p[0], p[1], p[2], p[3], GREEDY_BELOW)
    else:
        chosen = processed.argmax(dim=-1)  # [B]
        idx = torch.tensor(rows, device=dev)
        s = [requests[i].sampling for i in rows]
        temps = torch.tensor([x.temperature for x in s], dtype=torch.float32, device=dev)
        top_k = torch.tensor([x.top_k for x in s], device=dev)
        top_p = torch.tensor([x.top_p for x in s], device=dev)
        chosen[idx] = draw(processed[idx], temps, top_k, top_p, torch.tensor(u, dtype=torch.float32, device=dev))
    tokens = chosen.tolist()
    info: list[TokenLogprob | None] = [None] * bsz
    want = [i for i, r in enumerate(requests) if r.sampling.logprobs]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)  # [w, V]
        k = max(requests[i].sampling.top_logprobs for i in want)
        top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (None, None)
        chosen_lp = lp.gather(1, chosen[want][:, None]).squeeze(1).tolist()
        for j, i in enumerate(want):
            n = requests[i].sampling.top_logprobs
            top = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist(), strict=True)) if n else []
            info[i] = TokenLogprob(tokens[i], chosen_lp[j], top)
    return tokens, info
