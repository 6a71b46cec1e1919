"""Vectorized per-row sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Each row draws exactly one uniform number per step from its own seeded generator and picks
the token by inverse CDF over its own filtered distribution, so a seeded request samples the
same tokens whatever else shares the batch. Logprobs are those of the model's raw distribution.
"""

from __future__ import annotations

import torch

from server.engine.request import Request, TokenLogprob


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


def sample(logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] float32 -> chosen token per row, and logprob info for rows that asked for it."""
    bsz = logits.shape[0]
    dev = logits.device
    processed = _apply_repetition_penalty(logits, requests)
    temps = torch.tensor([r.sampling.temperature for r in requests], dtype=torch.float32, device=dev)
    greedy = temps <= 0  # [B]
    chosen = processed.argmax(dim=-1)  # [B]
    if not bool(greedy.all()):
        idx = (~greedy).nonzero().flatten()  # rows that sample
        sub = processed[idx] / temps[idx, None]  # [b, V]
        top_k = torch.tensor([requests[i].sampling.top_k for i in idx.tolist()], device=dev)
        top_p = torch.tensor([requests[i].sampling.top_p for i in idx.tolist()], device=dev)
        sorted_logits, order = sub.sort(dim=-1, descending=True)  # [b, V]
        ranks = torch.arange(sub.shape[-1], device=dev)[None, :]
        drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        probs = probs.masked_fill((before >= top_p[:, None]) & (ranks > 0), 0.0)
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
