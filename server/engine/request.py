"""A validated generation request as the engine sees it, and the events it emits back."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from server.ports import AdapterRef


class FinishReason(str, Enum):
    LENGTH = "LENGTH"
    STOP = "STOP"
    EOS = "EOS"
    CANCELLED = "CANCELLED"


@dataclass
class Sampling:
    """Resolved per-request sampling settings (server defaults already applied)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS is masked and stop strings ignored until this many tokens
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class TokenEvent:
    """New output since the previous event of this request."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    total_s: float


@dataclass
class ErrorEvent:
    """The request failed inside the engine; `code` is a grpc.StatusCode name."""

    code: str
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass(eq=False)
class Request:
    """One generation request, owned by the engine thread once submitted."""

    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]  # called from the engine thread; must not block
    adapter: AdapterRef | None = None  # from the adapter catalog; None = the base model
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None  # first admission
    first_token_at: float | None = None
    queue_s: float = 0.0  # time spent waiting for admission so far, preempted time included
    waiting_since: float | None = None  # set while waiting (None while running)
    # engine-side state
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # block table: page i holds KV entries [i*P, (i+1)*P)
    prefix_len: int = 0  # KV entries before the prompt (virtual tokens of a prompt/prefix adapter)
    cached: int = 0  # KV entries computed so far (prefix included)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    namespace: tuple = ()  # prefix-cache namespace at the latest admission
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks known so far
    published: int = 0  # leading pages already offered to the prefix cache
    admit_order: int = 0  # larger = admitted more recently (the preemption victim)
    preemptions: int = 0
    text: str = ""  # full decoded text so far (stop strings already cut)
    sent_chars: int = 0  # how much of `text` has been emitted
    read_offset: int = 0  # incremental detokenization offsets (into output_ids)
    prefix_offset: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "CANCELLED"
    rng: random.Random | None = None
    finished: bool = False
    # More samples of this prompt (n > 1), waiting inside this request until its prompt is computed:
    # then each starts from that KV (Engine._fork) instead of prefilling the prompt again.
    forks: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
        self.rng = random.Random(seed)
        self.waiting_since = self.submitted_at

    def cancel(self, reason: str = "CANCELLED") -> None:
        """Thread-safe: ask the engine to stop this request at its next step."""
        self.cancel_reason = reason
        self.cancelled.set()

    @property
    def num_tokens(self) -> int:
        """Known tokens: the prompt plus every generated token."""
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, stop: int) -> list[int]:
        """Known tokens [start, stop) of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:stop - n]
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    @property
    def total_tokens_needed(self) -> int:
        """KV entries this request may occupy: prefix + prompt + every new token."""
        return self.prefix_len + len(self.prompt_ids) + self.sampling.max_new_tokens
