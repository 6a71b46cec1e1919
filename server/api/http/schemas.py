"""Pydantic models of the OpenAI request bodies adapterserve accepts (unknown fields are ignored).

Only the shape is checked here (types, the OpenAI ranges of ``n`` and the logprob counts); every
rule the gRPC API has (lengths, limits, sampling ranges) is applied once, by the shared core, to
the ``GenerateRequest`` these bodies become (``server.api.http.convert``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class AdapterWeightBody(_Body):
    """One LoRA adapter of a weighted mix (adapterserve's extra, as GenerateRequest.adapters)."""

    adapter_id: str
    weight: float = 1.0


class _Sampling(_Body):
    """Fields chat and legacy completions share (vLLM's extras included)."""

    model: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0 = disabled
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    # adapterserve extra: a weighted mix of LoRA adapters (with `model` = the base model)
    adapters: list[AdapterWeightBody] | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    # fields of tool calling, refused when present
    tool_calls: list[Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class LoadLoraRequest(_Body):
    """vLLM's body (any adapter kind despite the name); the path is resolved under --adapter-root."""

    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Body):
    lora_name: str


class AdapterFiles(_Body):
    config_json: str  # adapter_config.json text
    safetensors_b64: str  # adapter_model.safetensors, base64


class RegisterAdapterBody(_Body):
    """Mirrors RegisterAdapterRequest: a path under --adapter-root or inline files."""

    id: str
    path: str | None = None
    files: AdapterFiles | None = None
    merge: bool = False
    pin: bool = False
    replace: bool = False


FinishReason = Literal["stop", "length"]
