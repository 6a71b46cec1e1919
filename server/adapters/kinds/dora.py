"""DoRA (PEFT ``LoraConfig(use_dora=True)``): weight-decomposed LoRA.

PEFT's eval forward (peft 0.21, ``tuners/lora/dora.py``), per output channel:
``y = m / ‖W + s·BA‖ ⊙ (Wx + s·BAx) + bias``, the norm over each row of ``W + s·BA``, detached.
The scale ``g = m / ‖W + s·BA‖`` depends only on the adapter and the base weights, so it is
computed once at registration: a DoRA row is a LoRA row (same slots, same batched math) plus one
per-row scale of the projection output, and ``(1 - g) ⊙ bias`` added where the projection has a
bias. Merged, ``W' = g ⊙ (W + s·BA)`` (PEFT's merge); rows of other adapters undo it per row.

Format: LoRA's tensors plus ``base_model.model.<module>.lora_magnitude_vector`` [out] per module.
Row vectors (see kinds.base): ``(layer, group, "out")`` and, with a bias, ``(layer, group, "shift")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from server.adapters.errors import AdapterFormatError
from server.adapters.kinds.base import BaseWeights, VectorKey, fused_vector
from server.model.config import ModelArgs

MAGNITUDE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?")


@dataclass
class DoraWeights:
    """A LoRA adapter's modules plus each module's magnitude vector m [out]."""

    modules: dict  # (layer, "q_proj") -> server.adapters.formats.LoraModule, as LoraWeights.modules
    magnitude: dict[tuple[int, str], torch.Tensor]  # (layer, "q_proj") -> [out] float32

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values()) + sum(
            v.nbytes for v in self.magnitude.values())

    def scales(self, base: BaseWeights) -> dict[tuple[int, str], torch.Tensor]:
        """g = m / ‖W + s·BA‖ per output channel [out] (float64 sums, as PEFT's norm detached)."""
        out = {}
        for key, mod in self.modules.items():
            weight, _ = base.projection(*key)
            combined = weight.double() + mod.scale * (mod.b.double() @ mod.a.double())  # [out, in]
            out[key] = (self.magnitude[key].double() / torch.linalg.vector_norm(combined, dim=1)).float()
        return out

    def row_vectors(self, base: BaseWeights) -> dict[VectorKey, torch.Tensor]:
        from server.adapters.lora_batch import GROUP_OF

        scales = self.scales(base)
        parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        shifts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for (layer, name), g in scales.items():
            parts.setdefault((layer, GROUP_OF[name]), {})[name] = g
            _, bias = base.projection(layer, name)
            if bias is not None:
                shifts.setdefault((layer, GROUP_OF[name]), {})[name] = (1 - g) * bias.float()
        vectors: dict[VectorKey, torch.Tensor] = {}
        for (layer, group), p in parts.items():
            vectors[(layer, group, "out")] = fused_vector(base.args, group, p, 1.0)
            if (layer, group) in shifts:
                vectors[(layer, group, "shift")] = fused_vector(base.args, group, shifts[(layer, group)], 0.0)
        return vectors


def split_magnitudes(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors, {module path: magnitude [out]})."""
    lora, magnitude = {}, {}
    for key, t in tensors.items():
        m = MAGNITUDE.fullmatch(key)
        if m:
            magnitude[m["module"]] = t
        else:
            lora[key] = t
    return lora, magnitude


def parse(modules: dict, magnitudes: dict[str, torch.Tensor], model: ModelArgs) -> DoraWeights:
    """Pair every LoRA module (already parsed and validated) with its magnitude vector."""
    by_path = {model.module_path(layer, name): (layer, name) for layer, name in modules}
    extra = sorted(set(magnitudes) - set(by_path))
    if extra:
        raise AdapterFormatError(f"lora_magnitude_vector of {extra[0][:120]} has no lora_A / lora_B")
    out = {}
    for path, key in by_path.items():
        if path not in magnitudes:
            raise AdapterFormatError(f"{path} has no lora_magnitude_vector (use_dora is set)")
        m = magnitudes[path]
        out_f = model.linear_shape(key[1])[0]
        if tuple(m.shape) != (out_f,):
            raise AdapterFormatError(f"shape mismatch at {path}: lora_magnitude_vector {tuple(m.shape)} but the "
                                     f"base projection has {out_f} outputs")
        out[key] = m
    return DoraWeights(modules=modules, magnitude=out)
