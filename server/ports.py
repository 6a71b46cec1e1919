"""The typed hand-offs between api, engine, adapters and model (Protocols, so each side can be read alone).

The request path through them: api acquires an :class:`AdapterRef` from the adapter catalog and submits a
``Request`` carrying it; the engine thread asks the :class:`AdapterResidency` to make it resident and for
its per-row math, runs the :class:`ModelRuntime`, and gives the reference back through
:class:`AdapterReleaser` when the request ends. Device changes asked for by API threads travel as
functions through :class:`EngineCommands` and run on the engine thread between steps.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch

from server.model.config import ModelArgs
from server.model.llama import AdapterRows, PagedKVCache, StepInput

T = TypeVar("T")

# (layer index, projection name such as "q_proj") -> tensor
ModuleKey = tuple[int, str]


class RequestRefused(Exception):
    """The engine must answer this request at once with `code` (a grpc.StatusCode name), never park it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ModelRuntime(Protocol):
    """The forward pass over a paged KV cache (server.model.llama.LlamaRuntime). Engine thread only."""

    args: ModelArgs
    device: str
    dtype: torch.dtype
    use_kernels: bool  # the Triton kernels run the forward (and the engine's sampling draw)

    def forward(self, step: StepInput, cache: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [B, V] at each row's last new token ([B, S, V] with `all_logits`)."""
        ...

    def add_deltas(self, deltas: dict[ModuleKey, torch.Tensor]) -> dict[ModuleKey, torch.Tensor]:
        """Add dense deltas [out, in] to the base weights; return the original rows (for restore_rows)."""
        ...

    def restore_rows(self, originals: dict[ModuleKey, torch.Tensor]) -> None:
        """Put back rows returned by add_deltas, bit for bit."""
        ...


class AdapterRef(Protocol):
    """One registered adapter as the engine sees it (server.adapters.catalog.AdapterEntry)."""

    adapter_id: str

    @property
    def num_virtual_tokens(self) -> int:
        """KV entries the adapter puts before the prompt (0 for LoRA)."""
        ...

    @property
    def slot(self) -> int | None:
        """LoRA device slot while resident (rows of one slot are batched together), else None."""
        ...


class AdapterResidency(Protocol):
    """Adapter device state: slots, LRU, merges, prefix KV. Engine thread only."""

    def activate(self, ref: AdapterRef) -> bool | None:
        """Make `ref` resident for a request joining the batch: True if it already was, False if loaded
        now, None if every slot it could use is busy with running requests (wait). Raises RequestRefused
        when it can never become resident."""
        ...

    def deactivate(self, ref: AdapterRef) -> None:
        """A request of `ref` left the batch."""
        ...

    def prefix_kv(self, ref: AdapterRef) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Device K/V [L, H_kv, n, D] written before the prompt, or None."""
        ...

    def kv_namespace(self, ref: AdapterRef | None) -> tuple:
        """What K/V of `ref`'s rows (None: base) depend on besides the tokens (the prefix cache's namespace)."""
        ...

    def lora_delta(self, refs: Sequence[AdapterRef | None]) -> AdapterRows | None:
        """Per-row adapter math for one step's rows (None = base row; a mix holds several LoRA adapters)."""
        ...


class AdapterReleaser(Protocol):
    """Reference counting of the catalog. Any thread."""

    def release(self, ref: AdapterRef) -> None:
        """A request holding `ref` ended (any outcome); the last one of an unregistered adapter frees it."""
        ...


class EngineCommands(Protocol):
    """Runs functions on the engine thread between steps. Any thread."""

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        ...
