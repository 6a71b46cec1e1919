"""``--method bottleneck``: bottleneck adapters (Pfeiffer, Houlsby) trained in the project's own environment.

PEFT has no bottleneck adapters and AdapterHub (``adapters``) cannot share this environment, so this module
injects the layers itself into the Hugging Face model being trained, computing exactly what the served kind
computes (:mod:`server.adapters.kinds.bottleneck`, AdapterHub's sequential ``Adapter``): with ``o`` a
sub-layer's output (self-attention or MLP) and ``r`` the residual stream it is added to,

    o' = o + W_up f(W_down h + b_down) + b_up,   h = o + r (Pfeiffer: original_ln_before) or o (Houlsby)

so the decoder layer's own residual add gives r + o + delta. The base is frozen; only the bottlenecks train.
They start as the identity (W_up = 0, b_up = 0), so a reference model (DPO) equals the policy at step 0.

The result is saved in AdapterHub's format (``save_adapter(..., use_safetensors=True)``):
``adapter_config.json`` ``{"config": <BnConfig>, "hidden_size", "model_class", "model_name", "model_type",
"name", "version"}`` and ``adapter.safetensors`` with ``model.layers.<i>.<attention|output>_adapters.adapters.
<name>.adapter_down.0.{weight,bias}`` / ``...adapter_up.{weight,bias}``. The modules are named so that the
model's own state-dict keys are those names.

How it plugs into the trainers: the model is passed to TRL as an instance (no ``peft_config``); its frozen
keys are in ``_keys_to_ignore_on_save``, so Trainer checkpoints hold the bottlenecks only and ``--resume``
loads them back (non-strict); :func:`export_adapterhub` turns the final save into AdapterHub's two files.

Thread: training runs on the main thread (one process per rank under ``accelerate launch``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.adapters.kinds.bottleneck import ACTIVATIONS
from training.cli import UsageError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"  # AdapterHub's SAFE_WEIGHTS_NAME
FORMAT_VERSION = "adapters.1.3.0"  # the AdapterHub release whose format this writes (and the reference loads)
PLACEMENTS = {  # --placement -> (AdapterHub config class, mh_adapter, original_ln_before, non_linearity)
    "pfeiffer": ("SeqBnConfig", False, True, "relu"),  # after the MLP only; the adapter reads o + r
    "houlsby": ("DoubleSeqBnConfig", True, False, "swish"),  # after attention and after the MLP; reads o
}
_NAME = re.compile(r"[^A-Za-z0-9_-]")


def hub_config(placement: str, reduction_factor: int) -> dict[str, Any]:
    """The ``config`` entry AdapterHub 1.3 writes for ``SeqBnConfig`` / ``DoubleSeqBnConfig`` with this
    reduction factor (every field, as ``save_adapter`` writes it; ``init_weights`` says how we initialise)."""
    if placement not in PLACEMENTS:
        raise UsageError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if reduction_factor < 1:
        raise UsageError(f"--reduction-factor must be >= 1, got {reduction_factor}")
    _, mh_adapter, ln_before, act = PLACEMENTS[placement]
    return {
        "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
        "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "mam_adapter",
        "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
        "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": mh_adapter,
        "non_linearity": act, "original_ln_after": True, "original_ln_before": ln_before, "output_adapter": True,
        "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
        "phm_rank": 1, "reduction_factor": reduction_factor, "residual_before_ln": True, "scaling": 1.0,
        "shared_W_phm": False, "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
    }


def adapter_name(output: str | Path) -> str:
    """The adapter's name inside the file (AdapterHub's ``name``): the output folder's name, made a key."""
    name = _NAME.sub("_", Path(output).resolve().name)[:64]
    return name or "bottleneck"


class Activation(nn.Module):
    """AdapterHub's non-linearity by name, the same function the server applies."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)


class Bottleneck(nn.Module):
    """One bottleneck layer: x [..., hidden] -> up f(down x + b_down) + b_up [..., hidden]."""

    def __init__(self, hidden: int, width: int, non_linearity: str) -> None:
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, width), Activation(non_linearity))
        self.adapter_up = nn.Linear(width, hidden)
        with torch.no_grad():  # AdapterHub's "mam_adapter" init: the layer starts as the identity
            nn.init.kaiming_uniform_(self.adapter_down[0].weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down[0].bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_down(x))


class AdapterSite(nn.Module):
    """The bottleneck after one sub-layer (AdapterHub's ``attention_adapters`` / ``output_adapters``).

    :meth:`keep_residual` receives the residual stream r (a forward pre-hook on the norm that starts the
    sub-layer); :meth:`after` rewrites the sub-layer's output o (a forward hook). Both run inside the same
    decoder-layer call, also when gradient checkpointing recomputes it.
    """

    def __init__(self, name: str, hidden: int, width: int, non_linearity: str, add_residual_input: bool) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({name: Bottleneck(hidden, width, non_linearity)})
        self.add_residual_input = add_residual_input
        self._residual: torch.Tensor | None = None

    def keep_residual(self, module: nn.Module, args: tuple) -> None:
        self._residual = args[0]  # [B, S, hidden]: the residual stream entering the sub-layer's norm

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        o = output[0] if isinstance(output, tuple) else output  # [B, S, hidden]
        h = o + self._residual if self.add_residual_input else o
        self._residual = None
        for adapter in self.adapters.values():
            o = o + adapter(h.to(adapter.adapter_up.weight.dtype)).to(o.dtype)
        return (o, *output[1:]) if isinstance(output, tuple) else o


def inject(model: nn.Module, placement: str, reduction_factor: int, name: str) -> list[AdapterSite]:
    """Freeze `model` and insert bottlenecks into every decoder layer (Llama-family module names)."""
    config = hub_config(placement, reduction_factor)
    hidden = model.config.hidden_size
    width = max(1, hidden // reduction_factor)  # AdapterHub's down_sample
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, a) for layer in layers
                                 for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
        raise UsageError(f"--method bottleneck: {type(model).__name__} is not a Llama-family model "
                         "(model.layers[i].self_attn / mlp / input_layernorm / post_attention_layernorm)")
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = set(model.state_dict())
    sites = []
    wanted = [("attention_adapters", "input_layernorm", "self_attn")] if config["mh_adapter"] else []
    wanted.append(("output_adapters", "post_attention_layernorm", "mlp"))
    for layer in layers:
        for attr, norm, sublayer in wanted:
            site = AdapterSite(name, hidden, width, config["non_linearity"], config["original_ln_before"])
            site.to(dtype=torch.float32, device=next(layer.parameters()).device)
            layer.add_module(attr, site)
            getattr(layer, norm).register_forward_pre_hook(site.keep_residual)
            getattr(layer, sublayer).register_forward_hook(site.after)
            sites.append(site)
    model._keys_to_ignore_on_save = frozen  # Trainer checkpoints and the final save hold the bottlenecks only
    return sites


def build_model(model_path: str, placement: str, reduction_factor: int, name: str, dtype: str, seed: int,
                gradient_checkpointing: bool = False) -> nn.Module:
    """The base causal LM from `model_path` (weights in `dtype`), frozen, with float32 bottlenecks injected."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    torch.manual_seed(seed)  # the bottlenecks' initialisation
    inject(model, placement, reduction_factor, name)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def bottleneck_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The AdapterHub tensors of a state dict (keys ``model.layers.<i>.<site>_adapters.adapters.<name>...``)."""
    return {k: v.detach().float().contiguous() for k, v in state.items() if "_adapters.adapters." in k}


def export_adapterhub(saved: Path, output: Path, placement: str, reduction_factor: int, name: str,
                      model_name: str) -> None:
    """Write AdapterHub's two files into `output` from a Trainer save folder `saved` (its ``config.json`` and
    ``model.safetensors``, which hold only the bottlenecks: see :func:`inject`)."""
    from safetensors.torch import load_file, save_file

    base = json.loads((saved / "config.json").read_text(encoding="utf-8"))
    state = load_file(str(saved / "model.safetensors"))
    tensors = bottleneck_tensors(state)
    extra = sorted(set(state) - set(tensors))
    if extra or not tensors:
        raise RuntimeError(f"the trainer saved {len(tensors)} bottleneck tensors and {len(extra)} others "
                           f"({', '.join(extra[:3])}): is --method bottleneck's model the one trained?")
    config = {
        "config": hub_config(placement, reduction_factor),
        "hidden_size": base["hidden_size"],
        "model_class": (base.get("architectures") or ["LlamaForCausalLM"])[0],
        "model_name": model_name,
        "model_type": base["model_type"],
        "name": name,
        "version": FORMAT_VERSION,
    }
    save_file(tensors, str(output / WEIGHTS_FILE), metadata={"format": "pt"})
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_trained(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject into a loaded base `model` the bottlenecks saved by :func:`export_adapterhub` (for references)."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    inner = config["config"]
    placement = "houlsby" if inner["mh_adapter"] else "pfeiffer"
    inject(model, placement, inner["reduction_factor"], config["name"])
    missing, unexpected = model.load_state_dict(load_file(str(Path(adapter_dir) / WEIGHTS_FILE)), strict=False)
    if unexpected or any("_adapters.adapters." in k for k in missing):
        raise ValueError(f"{adapter_dir}: tensors do not fit the injected layers ({(unexpected or missing)[:3]})")
    return model
