"""IA3 (PEFT ``IA3Config``): learned vectors that rescale, per row, the outputs of the attention
modules an adapter targets and the inputs of its ``feedforward_modules``.

Format (peft 0.21, checked in tests/adapters/test_kinds.py): ``base_model.model.<module>.ia3_l``,
[out, 1] for an output scale, [1, in] for a feed-forward (input) scale. PEFT's forward:
``base(x) * l`` (the bias is scaled too) and ``base(x * l)``. A module is feed-forward when its
path ends with an entry of ``feedforward_modules`` (a list), or fully matches it (a string).

Served: output scales on any projection; input scales on o_proj and down_proj, whose input is
their own (q/k/v and gate/up share one input inside a fused projection here: refused).
Row vectors (see kinds.base): ``(layer, group, "out")`` and ``(layer, group, "in")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from server.adapters.errors import AdapterFormatError
from server.adapters.kinds.base import BaseWeights, VectorKey, check_layer, fused_vector, module_tensors
from server.adapters.patterns import TargetModules
from server.model.config import LINEAR_MODULES, ModelArgs

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.ia3_l(?:\.[A-Za-z0-9_-]+)?")
_LAYER_MODULE = re.compile(r"model\.layers\.(?P<layer>\d{1,6})\.(?:self_attn|mlp)\.(?P<name>\w+)")
# Projections whose input is not shared with another projection of the fused matmul.
OWN_INPUT = ("o_proj", "down_proj")
_UNSUPPORTED = {"modules_to_save": "fully trained extra modules", "fan_in_fan_out": "Conv1D-style weights"}


@dataclass
class Ia3Weights:
    """Per adapted projection: its vector and whether it scales the input (feed-forward) or the output."""

    vectors: dict[tuple[int, str], torch.Tensor]  # (layer, "k_proj") -> [out] or [in] float32
    feedforward: frozenset[tuple[int, str]]  # modules whose vector scales the input

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.vectors.values())

    def row_vectors(self, base: BaseWeights) -> dict[VectorKey, torch.Tensor]:
        """Output scales fused per group (ones for untargeted projections); input scales of o/down."""
        from server.adapters.lora_batch import GROUP_OF

        out_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        vectors: dict[VectorKey, torch.Tensor] = {}
        for (layer, name), v in self.vectors.items():
            group = GROUP_OF[name]
            if (layer, name) in self.feedforward:
                vectors[(layer, group, "in")] = v.float()
            else:
                out_parts.setdefault((layer, group), {})[name] = v
        for (layer, group), parts in out_parts.items():
            vectors[(layer, group, "out")] = fused_vector(base.args, group, parts, 1.0)
        return vectors


def check_config(config: dict) -> None:
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFormatError(f"unsupported IA3 feature {key}={config[key]!r} ({what})")
    ff = config.get("feedforward_modules")
    if ff is not None and not isinstance(ff, str) and not (
            isinstance(ff, list) and all(isinstance(k, str) for k in ff)):
        raise AdapterFormatError("feedforward_modules must be a string or a list of strings")


def parse(tensors: dict[str, torch.Tensor], config: dict, model: ModelArgs) -> Ia3Weights:
    """Validate the ``ia3_l`` tensors against the base model and the config."""
    vectors: dict[tuple[int, str], torch.Tensor] = {}
    feedforward = set()
    # PEFT's rule (a regex full match, or names the path ends with), bounded in time: client input.
    ff_modules = TargetModules("feedforward_modules", config.get("feedforward_modules"))
    for m, t in module_tensors(tensors, _KEY, "IA3", "ia3_l"):
        module = m["module"]
        lm = _LAYER_MODULE.fullmatch(module)
        if not lm or lm["name"] not in LINEAR_MODULES or model.module_path(int(lm["layer"]), lm["name"]) != module:
            raise AdapterFormatError(
                f"unsupported IA3 target {module[:120]}; only {', '.join(LINEAR_MODULES)} in decoder layers")
        layer, name = int(lm["layer"]), lm["name"]
        check_layer(layer, model, "IA3")
        out_f, in_f = model.linear_shape(name)
        ff = ff_modules.matches(module)
        want = (1, in_f) if ff else (out_f, 1)
        if tuple(t.shape) != want:
            role = "feed-forward (input) vector [1, in]" if ff else "output vector [out, 1]"
            raise AdapterFormatError(f"shape mismatch at {module}: ia3_l {tuple(t.shape)} but its {role} "
                                     f"is {want} on the base model")
        if ff and name not in OWN_INPUT:
            raise AdapterFormatError(
                f"unsupported IA3 feature: feedforward_modules includes {name} ({module}); its input is shared "
                f"inside a fused projection here, only {' and '.join(OWN_INPUT)} take a feed-forward scale")
        if ff:
            feedforward.add((layer, name))
        vectors[(layer, name)] = t.reshape(-1)
    return Ia3Weights(dict(sorted(vectors.items())), frozenset(feedforward))
