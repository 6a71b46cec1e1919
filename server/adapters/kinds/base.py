"""What every per-row adapter kind shares: its parsed weights become *row vectors*.

A row vector is one of four per-row hooks of the forward pass (server.model.llama.AdapterRows),
keyed ``(layer, group, role)`` where group is a fused projection ("qkv", "o", "gate_up", "down") or
a norm ("attn_norm", "mlp_norm"; the final norm is layer ``num_layers``, group "norm"):

- ``"out"``   [out_fused]: the projection output is multiplied by it (IA3 attention targets, DoRA's m/‖W+sBA‖);
- ``"shift"`` [out_fused]: then this is added (DoRA on a projection with a bias: (1 - scale) * bias);
- ``"in"``    [in]: the projection input is multiplied by it (IA3 feed-forward targets);
- ``"norm"``  [hidden]: the RMSNorm weight itself (LayerNorm tuning).

A kind fills only the keys it changes; the other rows of a step read the identity (ones, zeros, or
the base norm weight). Vectors are computed once at registration (engine thread, from the base
weights as loaded, never from merged ones), so a step only gathers them per row.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from server.adapters.errors import AdapterFormatError
from server.model.config import ModelArgs

# (layer, group, role): see the module docstring.
VectorKey = tuple[int, str, str]
ROLES = ("out", "shift", "in", "norm")


class BaseWeights(Protocol):
    """The frozen base weights a kind's row vectors are derived from (original, never merged)."""

    args: ModelArgs

    def projection(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [out, in], bias [out] or None) of projection `name` ("q_proj", ...) of `layer`."""
        ...

    def norm(self, layer: int, group: str) -> torch.Tensor:
        """RMSNorm weight [hidden]: group "attn_norm" / "mlp_norm" of `layer`, or "norm" (layer = num_layers)."""
        ...


class RowVectorKind(Protocol):
    """A kind whose rows change the forward through row vectors (IA3, LN tuning, DoRA's scale)."""

    def row_vectors(self, base: BaseWeights) -> dict[VectorKey, torch.Tensor]:
        """The adapter's row vectors (float32, host), computed once at registration."""
        ...


def row_vector_kind(weights: object) -> RowVectorKind | None:
    """`weights` as a RowVectorKind if its kind has row vectors, else None."""
    return weights if callable(getattr(weights, "row_vectors", None)) else None  # type: ignore[return-value]


def identity(base: BaseWeights, key: VectorKey, width: int) -> torch.Tensor:
    """The value rows without a vector at `key` read: ones, zeros (shift) or the base norm weight."""
    layer, group, role = key
    if role == "norm":
        return base.norm(layer, group).float()
    return torch.zeros(width) if role == "shift" else torch.ones(width)


def group_width(args: ModelArgs, group: str, role: str) -> int:
    """Width of a row vector: the fused output (out, shift), the input (in) or hidden (norm)."""
    from server.adapters.lora_batch import GROUPS

    if role == "norm":
        return args.hidden_size
    names = GROUPS[group]
    if role == "in":
        return args.linear_shape(names[0])[1]
    return sum(args.linear_shape(m)[0] for m in names)


def fused_vector(args: ModelArgs, group: str, parts: dict[str, torch.Tensor], fill: float) -> torch.Tensor:
    """One [out_fused] vector from per-projection parts {"k_proj": [out_k], ...}; `fill` elsewhere."""
    from server.adapters.lora_batch import GROUPS

    pieces = []
    for name in GROUPS[group]:
        out_f = args.linear_shape(name)[0]
        pieces.append(parts[name].reshape(out_f).float() if name in parts else torch.full((out_f,), fill))
    return torch.cat(pieces)


def module_tensors(tensors: dict[str, torch.Tensor], key: re.Pattern[str], kind: str,
                   param: str) -> list[tuple[re.Match[str], torch.Tensor]]:
    """Every tensor of a PEFT `kind` file with the match of its name against `key` (a full match); an
    unexpected name or a file without tensors (`param`: the kind's tensor name, e.g. ``ia3_l``) is refused."""
    if not tensors:
        raise AdapterFormatError(f"{kind} adapter matches no modules (no {param} tensors)")
    found = []
    for name, t in tensors.items():
        m = key.fullmatch(name)
        if not m:
            raise AdapterFormatError(f"unexpected tensor {name[:160]} in an {kind} adapter")
        found.append((m, t))
    return found


def check_layer(layer: int, model: ModelArgs, kind: str) -> None:
    """Refuse a decoder layer index the base model does not have."""
    if layer >= model.num_layers:
        raise AdapterFormatError(f"{kind} targets layer {layer} but the base model has {model.num_layers} layers")
