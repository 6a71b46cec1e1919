"""Vectorized per-row sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Each row draws exactly one uniform number per step from its own seeded generator and picks
the token by inverse CDF over its own filtered distribution, so a seeded request samples the
same tokens whatever else shares the batch. Logprobs are those of the model's raw distribution.

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
    sorted_logits, order = sub.sort(dim=-1, descending=True)  # [b, V]
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


def sample(logits: torch.Tensor, requests: list[Request],
           eos_ids: Sequence[int] = ()) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] float32 -> chosen token per row, and logprob info for rows that asked for it.

    `eos_ids` are masked out of rows that have not generated their ``min_new_tokens`` yet.
    """
    bsz = logits.shape[0]
    dev = logits.device
    processed = _mask_early_eos(_apply_repetition_penalty(logits, requests), requests, eos_ids)
    temps = torch.tensor([r.sampling.temperature for r in requests], dtype=torch.float32, device=dev)
    greedy = temps < GREEDY_BELOW  # [B]
    chosen = processed.argmax(dim=-1)  # [B]
    if not all(r.sampling.temperature <= 0 for r in requests):  # decided on the host: no device sync
        idx = (~greedy).nonzero().flatten()  # rows that sample
        top_k = torch.tensor([requests[i].sampling.top_k for i in idx.tolist()], device=dev)
        top_p = torch.tensor([requests[i].sampling.top_p for i in idx.tolist()], device=dev)
        probs, order = filtered_probs(processed[idx], temps[idx], top_k, top_p)
        cdf = probs.cumsum(dim=-1)  # [b, V]
        u = torch.tensor([requests[i].rng.random() for i in idx.tolist()], dtype=torch.float32, device=dev)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(cdf.shape[-1] - 1)
        chosen[idx] = order.gather(1, pick).squeeze(1)
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
