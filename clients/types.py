"""Plain result types returned by the clients (no protobuf objects leak out).

Enum values become lower-case strings: finish reasons ``"length" | "stop" | "eos" |
"cancelled"`` (``""`` when unset), adapter types ``"lora" | "prompt_tuning" | "p_tuning" |
"prefix_tuning" | "dora" | "ia3" | "ln_tuning"``, adapter states ``"registered" | "resident" | "merged" | "draining"``.
Every type converts to plain dicts with :func:`dataclasses.asdict` (the CLI's ``--json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapterserve.v1 import adapterserve_pb2 as pb


def _enum_name(enum, value: int) -> str:
    """Lower-case enum name; '' for the *_UNSPECIFIED zero value or an unknown number."""
    try:
        name = enum.Name(value)
    except ValueError:
        return ""
    return "" if name.endswith("_UNSPECIFIED") else name.lower()


@dataclass
class TopLogprob:
    """One alternative token at a position."""

    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and, if asked for, the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_proto(cls, m: pb.TokenLogprob) -> TokenLogprob:
        """Build from the protobuf message."""
        return cls(m.token_id, m.token, m.logprob,
                   [TopLogprob(t.token_id, t.token, t.logprob) for t in m.top])


@dataclass
class Timings:
    """Server-side timings in milliseconds, measured from submission."""

    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0

    @classmethod
    def from_proto(cls, m: pb.Timings) -> Timings:
        """Build from the protobuf message."""
        return cls(m.queue_ms, m.time_to_first_token_ms, m.total_ms)


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationResult:
    """A finished completion (``generate``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob]
    timings: Timings
    adapter_id: str
    request_id: str

    @property
    def usage(self) -> Usage:
        """Prompt and completion token counts."""
        return Usage(self.prompt_tokens, self.completion_tokens)

    @classmethod
    def from_proto(cls, m: pb.GenerateResponse) -> GenerationResult:
        """Build from a GenerateResponse."""
        return cls(
            text=m.text,
            token_ids=list(m.token_ids),
            finish_reason=_enum_name(pb.FinishReason, m.finish_reason),
            prompt_tokens=m.usage.prompt_tokens,
            completion_tokens=m.usage.completion_tokens,
            logprobs=[TokenLogprob.from_proto(lp) for lp in m.logprobs],
            timings=Timings.from_proto(m.timings),
            adapter_id=m.adapter_id,
            request_id=m.request_id,
        )


@dataclass
class StreamChunk:
    """One message of a stream: the text generated since the previous chunk.

    ``finish_reason``, ``usage`` and ``timings`` are None on every chunk but the last.
    """

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    usage: Usage | None
    timings: Timings | None
    request_id: str
    adapter_id: str

    @property
    def is_last(self) -> bool:
        """True on the final chunk (the one carrying finish_reason and usage)."""
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, m: pb.GenerateStreamResponse) -> StreamChunk:
        """Build from a GenerateStreamResponse."""
        last = m.finish_reason != pb.FINISH_REASON_UNSPECIFIED or m.HasField("usage")
        return cls(
            text=m.text,
            token_ids=list(m.token_ids),
            logprobs=[TokenLogprob.from_proto(lp) for lp in m.logprobs],
            finish_reason=_enum_name(pb.FinishReason, m.finish_reason) if last else None,
            usage=Usage(m.usage.prompt_tokens, m.usage.completion_tokens) if last else None,
            timings=Timings.from_proto(m.timings) if m.HasField("timings") else None,
            request_id=m.request_id,
            adapter_id=m.adapter_id,
        )


def collect(chunks: list[StreamChunk]) -> GenerationResult:
    """Join the chunks of one stream into the :class:`GenerationResult` ``generate`` would give."""
    last = chunks[-1] if chunks else None
    usage = (last.usage if last else None) or Usage()
    return GenerationResult(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=(last.finish_reason if last else None) or "",
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        logprobs=[lp for c in chunks for lp in c.logprobs],
        timings=(last.timings if last else None) or Timings(),
        adapter_id=last.adapter_id if last else "",
        request_id=last.request_id if last else "",
    )


@dataclass
class AdapterInfo:
    """A registered adapter as the server describes it."""

    adapter_id: str
    type: str
    rank: int
    num_virtual_tokens: int
    target_modules: list[str]
    size_bytes: int
    state: str
    pinned: bool
    merged: bool
    load_ms: float
    base_model: str
    active_requests: int

    @classmethod
    def from_proto(cls, m: pb.Adapter) -> AdapterInfo:
        """Build from an Adapter message."""
        return cls(
            adapter_id=m.adapter_id,
            type=_enum_name(pb.AdapterType, m.type),
            rank=m.rank,
            num_virtual_tokens=m.num_virtual_tokens,
            target_modules=list(m.target_modules),
            size_bytes=m.size_bytes,
            state=_enum_name(pb.AdapterState, m.state),
            pinned=m.pinned,
            merged=m.merged,
            load_ms=m.load_ms,
            base_model=m.base_model,
            active_requests=m.active_requests,
        )


@dataclass
class Limits:
    """The server's configured limits."""

    max_context_tokens: int = 0
    kv_cache_tokens: int = 0
    max_batch_size: int = 0
    max_queue: int = 0
    default_max_new_tokens: int = 0
    max_top_logprobs: int = 0
    max_lora_rank: int = 0
    max_virtual_tokens: int = 0
    max_resident_adapters: int = 0


@dataclass
class Kernels:
    """The kernels the server chose for its machine at start (matmul backend, dtypes, CPU features)."""

    matmul: str = ""
    dtype: str = ""
    kv_dtype: str = ""
    cpu_capability: str = ""
    cpu_features: list[str] = field(default_factory=list)
    native_bf16: bool = False
    onednn_bf16: bool = False
    note: str = ""
    decode: str = ""  # CPU decode-step kernels: "ours", "torch", or "" (not CPU oneDNN, float32 or bf16)


@dataclass
class ModelInfo:
    """The served base model and the server's limits (``model_info``)."""

    name: str
    architecture: str
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    num_layers: int
    hidden_size: int
    version: str
    limits: Limits
    kernels: Kernels = field(default_factory=Kernels)

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> ModelInfo:
        """Build from a ModelInfo message."""
        lim, k = m.limits, m.kernels
        return cls(
            name=m.name, architecture=m.architecture, vocab_size=m.vocab_size,
            max_context=m.max_context, dtype=m.dtype, device=m.device,
            num_layers=m.num_layers, hidden_size=m.hidden_size, version=m.version,
            limits=Limits(
                lim.max_context_tokens, lim.kv_cache_tokens, lim.max_batch_size, lim.max_queue,
                lim.default_max_new_tokens, lim.max_top_logprobs, lim.max_lora_rank,
                lim.max_virtual_tokens, lim.max_resident_adapters,
            ),
            kernels=Kernels(k.matmul, k.dtype, k.kv_dtype, k.cpu_capability, list(k.cpu_features), k.native_bf16,
                            k.onednn_bf16, k.note, k.decode),
        )
