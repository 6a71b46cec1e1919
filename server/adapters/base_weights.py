"""The base model's original weights as the kinds' row vectors need them (server.adapters.kinds.base.BaseWeights).

A merged adapter edits the dense weights in place; the row vectors of an adapter registered later
must still come from the weights as loaded, so merged projections read their saved original rows.

Threads: engine thread only (it reads weights a merge may be editing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.model.config import ModelArgs


class RuntimeBaseWeights:
    """BaseWeights over a LlamaRuntime; `originals()` gives the saved rows of merged projections."""

    def __init__(self, runtime, originals: Callable[[], dict[tuple[int, str], torch.Tensor]]):
        self.runtime = runtime
        self.args: ModelArgs = runtime.args
        self._originals = originals

    def projection(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, rows = self.runtime.fused_rows(layer, name)
        original = self._originals().get((layer, name))
        lw = self.runtime.w.layers[layer]
        bias = None
        if name in self.runtime.qkv_slices and lw.bqkv is not None:
            bias = lw.bqkv[rows]
        elif name == "o_proj":
            bias = lw.bo
        return (weight[rows] if original is None else original).float(), None if bias is None else bias.float()

    def norm(self, layer: int, group: str) -> torch.Tensor:
        if group == "norm":
            return self.runtime.w.norm
        lw = self.runtime.w.layers[layer]
        return lw.attn_norm if group == "attn_norm" else lw.mlp_norm
