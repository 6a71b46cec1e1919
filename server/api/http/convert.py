"""OpenAI request bodies -> the GenerateRequests the shared core validates; core events -> OpenAI JSON.

One body becomes one GenerateRequest per choice: ``n`` independent samples of each prompt (choice
``p * n + j`` is sample ``j`` of prompt ``p``; the app starts a prompt's samples together, so the
engine prefills it once and forks them). A seeded request's sample j gets seed
``(seed + j) mod 2**64``, so the same body reproduces every choice, and equals the separate
requests with those seeds.
Thread domain: the event loop (pure functions, no I/O).
"""

from __future__ import annotations

import math

from adapterserve.v1 import adapterserve_pb2 as pb
from server.api.http.errors import OpenAIError
from server.api.http.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from server.engine.request import FinishEvent, FinishReason, TokenLogprob

# Field names of the shared validation's messages -> the OpenAI body's names.
FIELD_NAMES = {
    "adapter_id": "model",
    "params.max_new_tokens": "max_tokens",
    "params.min_new_tokens": "min_tokens",
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.repetition_penalty": "repetition_penalty",
    "params.stop": "stop",
    "prompt_token_ids": "prompt",
    "top_logprobs": "top_logprobs",
    "messages": "messages",
    "prompt": "prompt",
    "input": "prompt",
}


def openai_field(message: str) -> tuple[str | None, str]:
    """(param, message) with the validation message's leading proto field renamed to the OpenAI one."""
    head, sep, rest = message.partition(":")
    base = head.split("[", 1)[0]
    if sep and base in FIELD_NAMES:
        name = FIELD_NAMES[base] + head[len(base):]
        return name, f"{name}:{rest}"
    return None, message


def _refuse(field: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"{field}: {why}", param=field)


def _common_checks(body: _Sampling) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value:
            raise _refuse(name, "not supported (only 0); use repetition_penalty")
    if body.logit_bias:
        raise _refuse("logit_bias", "not supported")
    if body.stream_options is not None and not body.stream:
        raise _refuse("stream_options", "only allowed when stream is true")


def _params(body: _Sampling) -> pb.SamplingParams:
    p = pb.SamplingParams(ignore_eos=body.ignore_eos)
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_new is not None:
        if max_new >= 2**32:
            raise _refuse("max_tokens", f"too large: {max_new}")
        p.max_new_tokens = max_new
    if body.temperature is not None:
        p.temperature = body.temperature
    if body.top_p is not None:
        p.top_p = body.top_p
    if body.top_k is not None and body.top_k > 0:
        if body.top_k >= 2**32:
            raise _refuse("top_k", f"too large: {body.top_k}")
        p.top_k = body.top_k
    if body.repetition_penalty is not None:
        p.repetition_penalty = body.repetition_penalty
    if body.min_tokens:
        if body.min_tokens >= 2**32:
            raise _refuse("min_tokens", f"too large: {body.min_tokens}")
        p.min_new_tokens = body.min_tokens
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    p.stop.extend(stops)
    for name in ("temperature", "top_p", "repetition_penalty"):
        v = getattr(body, name)
        if v is not None and not math.isfinite(v):
            raise _refuse(name, f"must be a finite number, got {v}")
    return p


def _samples(template: pb.GenerateRequest, body: _Sampling, prompt_index: int) -> list[pb.GenerateRequest]:
    out = []
    for j in range(body.n):
        req = pb.GenerateRequest()
        req.CopyFrom(template)
        if body.seed is not None:
            req.params.seed = (body.seed + j) % 2**64
        req.request_id = f"{template.request_id}-{prompt_index * body.n + j}"
        out.append(req)
    return out


def _add_mix(req: pb.GenerateRequest, body: _Sampling) -> None:
    """The body's ``adapters`` extra (a weighted LoRA mix) onto the request; the core validates it."""
    for part in body.adapters or []:
        req.adapters.append(pb.AdapterWeight(adapter_id=part.adapter_id, weight=part.weight))


def chat_requests(body: ChatCompletionRequest, adapter_id: str, request_id: str) -> list[pb.GenerateRequest]:
    """The n GenerateRequests of a chat completion (the messages are templated by the core)."""
    _common_checks(body)
    if body.tools:
        raise _refuse("tools", "tool calling is not supported")
    if body.functions:
        raise _refuse("functions", "function calling is not supported")
    if body.tool_choice not in (None, "none", "auto"):
        raise _refuse("tool_choice", "tool calling is not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "only type 'text' is supported")
    req = pb.GenerateRequest(adapter_id=adapter_id, request_id=request_id, params=_params(body))
    _add_mix(req, body)
    if not body.messages:
        raise _refuse("messages", "must hold at least one message")
    for i, m in enumerate(body.messages):
        if m.tool_calls:
            raise _refuse(f"messages[{i}].tool_calls", "tool calling is not supported")
        if isinstance(m.content, list):
            texts = []
            for k, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise _refuse(f"messages[{i}].content[{k}].type", f"only text parts are supported, got {part.type!r}")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        req.messages.messages.append(pb.ChatMessage(role=m.role, content=content))
    if body.logprobs:
        req.return_logprobs = True
        req.top_logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise _refuse("top_logprobs", "requires logprobs: true")
    return _samples(req, body, 0)


def completion_requests(body: CompletionRequest, adapter_id: str, request_id: str) -> list[pb.GenerateRequest]:
    """n GenerateRequests per prompt of a legacy completion (a string, strings, token ids or lists of them)."""
    _common_checks(body)
    if body.echo:
        raise _refuse("echo", "not supported")
    if body.suffix:
        raise _refuse("suffix", "not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise _refuse("best_of", "only best_of = n is supported")
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise _refuse("prompt", "must not be empty")
    if len(prompts) * body.n > 64:
        raise _refuse("prompt", f"at most 64 prompts x n per request, got {len(prompts)} x {body.n}")
    out: list[pb.GenerateRequest] = []
    for i, prompt in enumerate(prompts):
        req = pb.GenerateRequest(adapter_id=adapter_id, request_id=request_id, params=_params(body))
        _add_mix(req, body)
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            if any(t < 0 for t in prompt):
                raise _refuse("prompt", "token ids must be >= 0")
            req.prompt_token_ids.ids.extend(prompt)
            if not prompt:
                raise _refuse("prompt", "must not be empty")
        if body.logprobs is not None:
            req.return_logprobs = True
            req.top_logprobs = body.logprobs
        out.extend(_samples(req, body, i))
    return out


# ---------------------------------------------------------------------------------- responses
def finish_reason(event: FinishEvent) -> str:
    return "length" if event.reason == FinishReason.LENGTH else "stop"


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(items: list[TokenLogprob], token_text) -> list[dict]:
    """``choices[i].logprobs.content`` entries of the chat shape."""
    out = []
    for lp in items:
        text = token_text(lp.token_id)
        out.append({"token": text, "logprob": lp.logprob, "bytes": _token_bytes(text),
                    "top_logprobs": [{"token": token_text(t), "logprob": v, "bytes": _token_bytes(token_text(t))}
                                     for t, v in lp.top]})
    return out


def completion_logprobs(items: list[TokenLogprob], token_text, offset: int) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    for lp in items:
        text = token_text(lp.token_id)
        tokens.append(text)
        lps.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:  # best first; tokens that decode alike keep the best one (the shape is keyed by text)
            top.setdefault(token_text(t), v)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
