"""Bottleneck adapters (adapter tuning: Houlsby, Pfeiffer) in AdapterHub's format (``adapters`` 1.3).

AdapterHub's sequential bottleneck (``methods/modeling.py`` ``Adapter``; ``BnConfig``) sits after a
decoder layer's attention output (``mh_adapter``, "attn") and/or its feed-forward output
(``output_adapter``, "mlp"). On Llama-family models AdapterHub passes no layer norm, so with
``residual_before_ln=True`` and ``original_ln_after=True`` a block whose sub-layer output is ``o`` on the
residual stream ``r`` becomes::

    r' = r + o + s * (W_up f(W_down h + b_down) + b_up),   h = o + r (original_ln_before) or o

``SeqBnConfig`` (Pfeiffer): "mlp" only, original_ln_before=True, ReLU; ``DoubleSeqBnConfig`` (Houlsby):
"attn" and "mlp", original_ln_before=False, swish. ``s`` is ``scaling`` (a number, or a trained scalar /
per-channel vector for "learned" / "channel"); it is folded into W_up and b_up at registration.
Refused, naming the field: parallel adapters, adapter layer norms (ln_before / ln_after), gating,
PHM layers, invertible adapters, other residual placements, a ConfigUnion or any other architecture.

Files: ``adapter_config.json`` as ``save_adapter`` writes it (``{"config": {...}, "hidden_size": ..,
"model_type": .., "name": .., "type": "text_task", "version": ..}``) and ``adapter_model.safetensors``
(``save_adapter(..., use_safetensors=True)``); tensors
``model.layers.<i>.<site>.adapters.<name>.adapter_down.0.{weight,bias}``,
``...adapter_up.{weight,bias}`` and, for learned scaling, ``...scaling``, where ``<site>`` is AdapterHub's
``attention_adapters`` (after self-attention) or ``output_adapters`` (after the MLP).

Thread: parsing runs on a registration worker thread; :func:`bottleneck_rows` is the per-row math
(engine thread).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.adapters.errors import AdapterFormatError
from server.adapters.patterns import shown
from server.model.config import ModelArgs

SITES = ("attn", "mlp")  # after self-attention (AdapterHub "mh_adapter"), after the MLP ("output_adapter")
_SITE_OF = {"attention_adapters": "attn", "output_adapters": "mlp"}
_KEY = re.compile(
    r"(?:model\.)?layers\.(?P<layer>\d{1,6})\.(?P<site>attention_adapters|output_adapters)\.adapters\."
    r"(?P<name>[^.]{1,128})\.(?P<param>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|"
    r"adapter_up\.bias|scaling)")

# AdapterHub's non_linearity names (transformers' get_activation, lower-cased) -> the same function.
ACTIVATIONS = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "linear": lambda x: x,
}

# BnConfig fields that change the inference forward beyond what is served -> refused when set.
_UNSUPPORTED = {
    "is_parallel": "parallel adapters",
    "ln_before": "an adapter layer norm before the down-projection",
    "ln_after": "an adapter layer norm after the up-projection",
    "use_gating": "adapter gating",
    "phm_layer": "PHM (parameterized hypercomplex) layers",
    "inv_adapter": "invertible adapters",
    "cross_adapter": "cross-attention adapters",
}


@dataclass
class BottleneckLayer:
    """One inserted bottleneck: delta = up f(down h + down_bias) + up_bias (scaling folded in)."""

    down: torch.Tensor  # [width, hidden] float32
    down_bias: torch.Tensor  # [width]
    up: torch.Tensor  # [hidden, width]
    up_bias: torch.Tensor  # [hidden]


@dataclass
class BottleneckWeights:
    """A parsed bottleneck adapter: its layers per (decoder layer, site) and its shared settings."""

    layers: dict[tuple[int, str], BottleneckLayer]  # (layer, "attn" | "mlp") -> weights
    non_linearity: str  # a key of ACTIVATIONS
    add_residual_input: bool  # original_ln_before: the adapter reads o + r, else o

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for m in self.layers.values() for t in (m.down, m.down_bias, m.up, m.up_bias))

    @property
    def width(self) -> int:
        """The largest bottleneck width (hidden_size // reduction_factor)."""
        return max(m.down.shape[0] for m in self.layers.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({site for _, site in self.layers})


def is_adapterhub_config(config: dict) -> bool:
    """Whether an ``adapter_config.json`` is AdapterHub's (``save_adapter``) rather than PEFT's."""
    return "peft_type" not in config and isinstance(config.get("config"), dict)


def check_config(config: dict, model: ModelArgs) -> dict:
    """The inner BnConfig of an AdapterHub config, refused (naming the field) outside what is served."""
    inner = config["config"]
    arch = inner.get("architecture")
    if arch == "union":
        configs = inner.get("configs")
        kinds = [c.get("architecture") or "bottleneck" for c in (configs if isinstance(configs, list) else [])
                 if isinstance(c, dict)]
        raise AdapterFormatError(f"unsupported AdapterHub config.architecture union (a ConfigUnion of "
                                 f"{', '.join(shown(k) for k in kinds[:4])}); only single bottleneck adapters")
    if arch not in (None, "bottleneck"):
        raise AdapterFormatError(f"unsupported AdapterHub config.architecture {shown(arch)}; "
                                 "only bottleneck adapters (SeqBnConfig, DoubleSeqBnConfig, BnConfig)")
    for key, what in _UNSUPPORTED.items():
        if inner.get(key):
            raise AdapterFormatError(f"unsupported AdapterHub feature config.{key}={shown(inner[key])} ({what})")
    for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after"):
        if not isinstance(inner.get(key), bool):
            raise AdapterFormatError(f"adapter_config.json: config.{key} must be true or false")
    if inner.get("residual_before_ln", True) is not True:
        raise AdapterFormatError(f"unsupported AdapterHub feature config.residual_before_ln="
                                 f"{shown(inner['residual_before_ln'])}; only true (the adapter's residual is "
                                 "the sub-layer output)")
    if inner["original_ln_after"] is not True:
        raise AdapterFormatError("unsupported AdapterHub feature config.original_ln_after=false (drops the "
                                 "decoder layer's residual stream)")
    if not (inner["mh_adapter"] or inner["output_adapter"]):
        raise AdapterFormatError("AdapterHub config: neither config.mh_adapter nor config.output_adapter is set")
    act = inner.get("non_linearity")
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise AdapterFormatError(f"unsupported AdapterHub config.non_linearity {shown(act)}; supported: "
                                 f"{', '.join(ACTIVATIONS)}")
    scaling = inner.get("scaling", 1.0)
    if not (scaling in ("learned", "channel") or (isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
                                                  and abs(float(scaling)) <= 1e3)):
        raise AdapterFormatError(f"unsupported AdapterHub config.scaling {shown(scaling)}; a number (|s| <= 1000), "
                                 "'learned' or 'channel'")
    hidden = config.get("hidden_size")
    if hidden is not None and hidden != model.hidden_size:
        raise AdapterFormatError(f"adapter_config.json: hidden_size {shown(hidden)} but the base model's is "
                                 f"{model.hidden_size}")
    return inner


def parse(tensors: dict[str, torch.Tensor], config: dict, model: ModelArgs, max_width: int) -> BottleneckWeights:
    """Validate AdapterHub's bottleneck tensors against the base model and the config."""
    inner = check_config(config, model)
    sites_allowed = {"attn"} if inner["mh_adapter"] else set()
    if inner["output_adapter"]:
        sites_allowed.add("mlp")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if not m:
            raise AdapterFormatError(f"unexpected tensor {key[:160]} in an AdapterHub bottleneck adapter")
        layer, site = int(m["layer"]), _SITE_OF[m["site"]]
        if layer >= model.num_layers:
            raise AdapterFormatError(f"bottleneck adapter targets layer {layer} but the base model has "
                                     f"{model.num_layers} layers")
        if site not in sites_allowed:
            flag = "mh_adapter" if site == "attn" else "output_adapter"
            raise AdapterFormatError(f"tensor {key[:160]} is at {m['site']} but config.{flag} is false")
        names.add(m["name"])
        parts.setdefault((layer, site), {})[m["param"]] = t
    if len(names) > 1:
        raise AdapterFormatError(f"the file holds several AdapterHub adapters ({', '.join(sorted(names))[:120]}); "
                                 "save one adapter per folder")
    if not parts:
        raise AdapterFormatError("bottleneck adapter has no adapter_down / adapter_up tensors")
    hidden = model.hidden_size
    layers: dict[tuple[int, str], BottleneckLayer] = {}
    for (layer, site), p in sorted(parts.items()):
        where = f"layer {layer} {site}"
        missing = [n for n in ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight",
                               "adapter_up.bias") if n not in p]
        if missing:
            raise AdapterFormatError(f"bottleneck adapter at {where} lacks {missing[0]}")
        down, down_b, up, up_b = (p["adapter_down.0.weight"], p["adapter_down.0.bias"], p["adapter_up.weight"],
                                  p["adapter_up.bias"])
        width = down.shape[0] if down.dim() == 2 else -1
        if tuple(down.shape) != (width, hidden) or tuple(down_b.shape) != (width,) or \
                tuple(up.shape) != (hidden, width) or tuple(up_b.shape) != (hidden,):
            raise AdapterFormatError(
                f"shape mismatch at {where}: adapter_down {tuple(down.shape)} / {tuple(down_b.shape)}, adapter_up "
                f"{tuple(up.shape)} / {tuple(up_b.shape)}; want [w, {hidden}] / [w], [{hidden}, w] / [{hidden}]")
        if width > max_width:
            raise AdapterFormatError(f"bottleneck width {width} at {where} exceeds --max-bottleneck-width {max_width}")
        scale = _scaling(inner, p.get("scaling"), where, hidden)
        layers[(layer, site)] = BottleneckLayer(down.float(), down_b.float(), (up.float() * scale[:, None]),
                                                up_b.float() * scale)
    return BottleneckWeights(layers, inner["non_linearity"].lower(), bool(inner["original_ln_before"]))


def _scaling(inner: dict, tensor: torch.Tensor | None, where: str, hidden: int) -> torch.Tensor:
    """The scaling as a [hidden] vector (a number, a learned scalar, or a learned per-channel vector)."""
    kind = inner.get("scaling", 1.0)
    if kind in ("learned", "channel"):
        want = (1,) if kind == "learned" else (hidden,)
        if tensor is None or tuple(tensor.shape) != want:
            got = "none" if tensor is None else tuple(tensor.shape)
            raise AdapterFormatError(f"config.scaling={kind} but the scaling tensor at {where} is {got}, want {want}")
        return tensor.float().reshape(-1).expand(hidden)
    if tensor is not None:
        raise AdapterFormatError(f"unexpected scaling tensor at {where}: config.scaling is a number")
    return torch.full((hidden,), float(kind))


def bottleneck_delta(h: torch.Tensor, layer: BottleneckLayer, non_linearity: str) -> torch.Tensor:
    """The definition, for one adapter: up f(down h + b_down) + b_up, h [..., hidden] -> [..., hidden]."""
    return F.linear(ACTIVATIONS[non_linearity](F.linear(h, layer.down, layer.down_bias)), layer.up, layer.up_bias)
