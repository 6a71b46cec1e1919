"""Merge-on-load plans: what folding one adapter into the base weights changes, per kind.

- LoRA: ``W' = W + s·BA``; other rows subtract ``s·BAx`` (low-rank).
- DoRA (PEFT's merge): ``W' = g ⊙ (W + s·BA)`` with g = m / ‖W + s·BA‖; other rows first undo g per
  output channel (scale 1/g, shift (1 - 1/g)·bias), then subtract ``s·BAx``.
- IA3: ``W' = l ⊙ W`` (output targets) or ``W' = W diag(l)`` (feed-forward targets); other rows
  scale the output (or the input) by 1/l. Output targets with a bias are refused (the bias would
  have to be scaled too).

The base weights keep their original rows (see server.model / the residency) for a bit-exact unmerge.
Threads: engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.adapters.formats import AdapterFormatError, AdapterKind, AdapterSpec
from server.adapters.kinds.base import BaseWeights, VectorKey, fused_vector

# Smallest |scale| a merged DoRA or IA3 may hold: other rows divide by it.
MIN_MERGE_SCALE = 1e-4


@dataclass
class MergePlan:
    deltas: dict[tuple[int, str], torch.Tensor]  # (layer, "q_proj") -> W' - W [out, in] float64
    lora_modules: dict = field(default_factory=dict)  # modules whose s·BA other rows subtract (LoRA, DoRA)
    undo: dict[VectorKey, torch.Tensor] = field(default_factory=dict)  # row vectors other rows apply


def merge_plan(spec: AdapterSpec, base: BaseWeights) -> MergePlan:
    """The deltas and corrections of merging `spec`; AdapterFormatError if it cannot be merged exactly."""
    from server.adapters.lora_batch import GROUP_OF

    w = spec.weights
    if spec.kind == AdapterKind.LORA:
        return MergePlan({k: (m.b.double() @ m.a.double()) * m.scale for k, m in w.modules.items()}, w.modules)
    if spec.kind == AdapterKind.DORA:
        scales = w.scales(base)
        plan = MergePlan({}, w.modules)
        outs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        shifts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for (layer, name), m in w.modules.items():
            g = _checked(scales[(layer, name)], "DoRA scale m/||W+sBA||", layer, name).double()
            weight, bias = base.projection(layer, name)
            full = weight.double() + m.scale * (m.b.double() @ m.a.double())
            plan.deltas[(layer, name)] = g[:, None] * full - weight.double()
            outs.setdefault((layer, GROUP_OF[name]), {})[name] = 1 / g
            if bias is not None:
                shifts.setdefault((layer, GROUP_OF[name]), {})[name] = (1 - 1 / g) * bias.double()
        for (layer, group), parts in outs.items():
            plan.undo[(layer, group, "out")] = fused_vector(base.args, group, parts, 1.0)
        for (layer, group), parts in shifts.items():
            plan.undo[(layer, group, "shift")] = fused_vector(base.args, group, parts, 0.0)
        return plan
    if spec.kind == AdapterKind.IA3:
        plan = MergePlan({})
        outs = {}
        for (layer, name), v in w.vectors.items():
            v = _checked(v, "IA3 vector", layer, name).double()
            weight, bias = base.projection(layer, name)
            if (layer, name) in w.feedforward:
                plan.deltas[(layer, name)] = weight.double() * (v - 1)[None, :]
                plan.undo[(layer, GROUP_OF[name], "in")] = (1 / v).float()
            else:
                if bias is not None:
                    raise AdapterFormatError(f"merge: IA3 scales the output of layer {layer} {name}, which has a bias; "
                                             "merging it would change the bias too (serve it unmerged)")
                plan.deltas[(layer, name)] = (v - 1)[:, None] * weight.double()
                outs.setdefault((layer, GROUP_OF[name]), {})[name] = 1 / v
        for (layer, group), parts in outs.items():
            plan.undo[(layer, group, "out")] = fused_vector(base.args, group, parts, 1.0)
        return plan
    raise AdapterFormatError(f"merge: only LORA, DORA and IA3 adapters can be merged, not {spec.kind.value}")


def _checked(v: torch.Tensor, what: str, layer: int, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(v).all()) or float(v.abs().min()) < MIN_MERGE_SCALE:
        raise AdapterFormatError(f"merge: the {what} of layer {layer} {name} holds an entry below {MIN_MERGE_SCALE} "
                                 "in magnitude or not finite; other rows could not undo it (serve it unmerged)")
    return v
