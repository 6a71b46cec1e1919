"""GenerateRequest (proto) -> prompt token ids + resolved Sampling, or InvalidRequestError naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapterserve.v1 import adapterserve_pb2 as pb
from server.api.errors import InvalidRequestError
from server.engine.request import Sampling
from server.engine.sampler import GREEDY_BELOW

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


@dataclass
class Limits:
    max_context: int  # prompt + prefix + completion
    kv_capacity_tokens: int
    default_max_new_tokens: int
    vocab_size: int
    max_adapters_per_request: int = 4


MAX_MIX_WEIGHT = 4.0


def adapter_mix(req: pb.GenerateRequest, max_adapters: int) -> list[tuple[str, float]]:
    """The request's weighted LoRA mix as [(adapter_id, weight)] (empty: none); checks count, weights, duplicates."""
    parts = req.adapters
    if not parts:
        return []
    if req.adapter_id:
        raise InvalidRequestError("adapters: mutually exclusive with adapter_id; give one or the other")
    if len(parts) > max_adapters:
        raise InvalidRequestError(f"adapters: at most {max_adapters} adapters per request "
                                  f"(--max-adapters-per-request), got {len(parts)}")
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i, p in enumerate(parts):
        if not p.adapter_id:
            raise InvalidRequestError(f"adapters[{i}].adapter_id: must not be empty")
        if p.adapter_id in seen:
            raise InvalidRequestError(f"adapters[{i}].adapter_id: {p.adapter_id!r} appears more than once")
        seen.add(p.adapter_id)
        weight = p.weight if p.HasField("weight") else 1.0
        if not math.isfinite(weight) or abs(weight) > MAX_MIX_WEIGHT:
            raise InvalidRequestError(f"adapters[{i}].weight: must be finite and in [-{MAX_MIX_WEIGHT:g}, "
                                      f"{MAX_MIX_WEIGHT:g}], got {weight}")
        out.append((p.adapter_id, float(weight)))
    return out


def prompt_ids(req: pb.GenerateRequest, tokenizer, vocab_size: int) -> list[int]:
    """Tokenize whichever input the request carries."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input: one of prompt, messages or prompt_token_ids is required")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt: must not be empty")
        ids = tokenizer.encode(req.prompt)
    elif which == "messages":
        msgs = req.messages.messages
        if not msgs:
            raise InvalidRequestError("messages: must hold at least one message")
        for i, m in enumerate(msgs):
            if m.role not in ("system", "user", "assistant", "tool"):
                raise InvalidRequestError(f"messages[{i}].role: must be system, user, assistant or tool, got {m.role!r}")
        try:
            ids = tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in msgs])
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        except Exception as e:  # template errors (e.g. role order the template rejects)
            raise InvalidRequestError(f"messages: chat template failed: {e}") from e
    else:
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequestError("prompt_token_ids: must not be empty")
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt_token_ids: id {bad} is outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise InvalidRequestError(f"{which}: tokenizes to zero tokens")
    return ids


def sampling(req: pb.GenerateRequest, n_prompt: int, prefix_len: int, limits: Limits) -> Sampling:
    """Apply server defaults to unset fields; reject explicit out-of-range values."""
    p = req.params
    used = n_prompt + prefix_len
    room = limits.max_context - used
    if room <= 0:
        raise InvalidRequestError(
            f"prompt: {n_prompt} tokens (+{prefix_len} virtual) reach the context limit of {limits.max_context}")
    if p.HasField("max_new_tokens"):
        max_new = p.max_new_tokens
        if max_new == 0:
            raise InvalidRequestError("params.max_new_tokens: must be >= 1")
        if max_new > room:
            raise InvalidRequestError(
                f"params.max_new_tokens: {max_new} + {used} prompt tokens exceed the context limit of {limits.max_context}")
    else:
        max_new = min(limits.default_max_new_tokens, room)
    if used + max_new > limits.kv_capacity_tokens:
        raise InvalidRequestError(
            f"params.max_new_tokens: prompt + completion ({used + max_new} tokens) exceed the KV cache "
            f"(--kv-cache-tokens {limits.kv_capacity_tokens})")
    temperature = p.temperature if p.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError(f"params.temperature: must be >= 0, got {temperature}")
    if temperature < GREEDY_BELOW:  # 1e-37 would overflow the scaled logits: it means greedy
        temperature = 0.0
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise InvalidRequestError(f"params.top_p: must be in (0, 1], got {top_p}")
    penalty = p.repetition_penalty if p.HasField("repetition_penalty") else 1.0
    if not math.isfinite(penalty) or penalty <= 0:
        raise InvalidRequestError(f"params.repetition_penalty: must be > 0, got {penalty}")
    top_k = p.top_k if p.HasField("top_k") else 0
    min_new = p.min_new_tokens if p.HasField("min_new_tokens") else 0
    if min_new > max_new:
        raise InvalidRequestError(f"params.min_new_tokens: {min_new} is more than max_new_tokens {max_new}")
    if req.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs: at most {MAX_TOP_LOGPROBS}, got {req.top_logprobs}")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"params.stop: at most {MAX_STOP_STRINGS} stop strings")
    if any(s == "" for s in p.stop):
        raise InvalidRequestError("params.stop: stop strings must not be empty")
    return Sampling(
        max_new_tokens=max_new,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        repetition_penalty=float(penalty),
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos,
        min_new_tokens=int(min_new),
        logprobs=req.return_logprobs or req.top_logprobs > 0,
        top_logprobs=int(req.top_logprobs),
    )
