"""LayerNorm tuning (PEFT ``LNTuningConfig``, the selective family on a Llama): trained copies of
RMSNorm weights (each layer's ``input_layernorm`` / ``post_attention_layernorm`` and the final
``norm``), per row.

Format (peft 0.21): ``base_model.model.<norm path>.ln_tuning_layers.weight`` [hidden]; PEFT's
forward runs the trained copy in place of the base norm. Row vectors (see kinds.base):
``(layer, "attn_norm" | "mlp_norm", "norm")`` and ``(num_layers, "norm", "norm")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from server.adapters.errors import AdapterFormatError
from server.adapters.kinds.base import BaseWeights, VectorKey, check_layer, module_tensors
from server.model.config import ModelArgs

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.ln_tuning_layers(?:\.[A-Za-z0-9_-]+)?\.(?P<param>\w+)")
_LAYER_NORM = re.compile(r"model\.layers\.(?P<layer>\d{1,6})\.(?P<name>input_layernorm|post_attention_layernorm)")
GROUP_OF_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


@dataclass
class LnTuningWeights:
    norms: dict[tuple[int, str], torch.Tensor]  # (layer, "attn_norm" | "mlp_norm") or (L, "norm") -> [hidden]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.norms.values())

    @property
    def target_modules(self) -> list[str]:
        names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "norm": "norm"}
        return sorted({names[g] for _, g in self.norms})

    def row_vectors(self, base: BaseWeights) -> dict[VectorKey, torch.Tensor]:
        return {(layer, group, "norm"): w.float() for (layer, group), w in self.norms.items()}


def check_config(config: dict) -> None:
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"unsupported LN_TUNING feature modules_to_save={config['modules_to_save']!r}")


def parse(tensors: dict[str, torch.Tensor], config: dict, model: ModelArgs) -> LnTuningWeights:
    """Validate the trained norm weights against the base model's RMSNorms."""
    norms: dict[tuple[int, str], torch.Tensor] = {}
    for m, t in module_tensors(tensors, _KEY, "LN_TUNING", "ln_tuning_layers"):
        module = m["module"]
        lm = _LAYER_NORM.fullmatch(module)
        if module == "model.norm":
            where = (model.num_layers, "norm")
        elif lm:
            where = (int(lm["layer"]), GROUP_OF_NORM[lm["name"]])
            check_layer(where[0], model, "LN_TUNING")
        else:
            target = module.rsplit(".", 1)[-1][:60]
            raise AdapterFormatError(f"unsupported LN_TUNING target {target} ({module[:120]}); only the RMSNorms "
                                     f"{', '.join(NORMS)}")
        if m["param"] != "weight":
            raise AdapterFormatError(f"unexpected tensor {m.string[:160]} in an LN_TUNING adapter (RMSNorm has only "
                                     "a weight)")
        if tuple(t.shape) != (model.hidden_size,):
            raise AdapterFormatError(f"shape mismatch at {module}: weight {tuple(t.shape)} but the base norm is "
                                     f"({model.hidden_size},)")
        norms[where] = t
    return LnTuningWeights(dict(sorted(norms.items())))
