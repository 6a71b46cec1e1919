"""What the bottleneck kind refuses, each with INVALID_ARGUMENT's message naming the field."""

from __future__ import annotations

import pytest
import torch

from server.adapters.errors import AdapterFormatError
from server.adapters.kinds import bottleneck
from server.model.config import ModelArgs

ARGS = ModelArgs(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=16, intermediate_size=32,
                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
SEQBN = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 4, "non_linearity": "relu",
         "original_ln_before": True, "original_ln_after": True, "residual_before_ln": True, "ln_before": False,
         "ln_after": False, "is_parallel": False, "scaling": 1.0, "use_gating": False, "inv_adapter": None,
         "phm_layer": False}
P = "model.layers.0.output_adapters.adapters.bn."


def _tensors(width=4, hidden=16, **extra):
    t = {P + "adapter_down.0.weight": torch.ones(width, hidden), P + "adapter_down.0.bias": torch.ones(width),
         P + "adapter_up.weight": torch.ones(hidden, width), P + "adapter_up.bias": torch.ones(hidden)}
    t.update(extra)
    return t


def _config(**inner):
    return {"config": {**SEQBN, **inner}, "hidden_size": 16, "model_type": "llama", "name": "bn"}


REFUSALS = {
    "parallel": (_config(is_parallel=True), _tensors(), "config.is_parallel"),
    "union": ({"config": {"architecture": "union", "configs": [{"architecture": "prefix_tuning"},
                                                                {"architecture": "lora"}]}}, _tensors(),
              "config.architecture union"),
    "lora": ({"config": {"architecture": "lora", "r": 8}}, _tensors(), "config.architecture 'lora'"),
    "invertible": (_config(inv_adapter="nice"), _tensors(), "config.inv_adapter"),
    "ln_before": (_config(ln_before=True), _tensors(), "config.ln_before"),
    "ln_after": (_config(ln_after=True), _tensors(), "config.ln_after"),
    "gating": (_config(use_gating=True), _tensors(), "config.use_gating"),
    "phm": (_config(phm_layer=True), _tensors(), "config.phm_layer"),
    "residual placement": (_config(residual_before_ln=False), _tensors(), "config.residual_before_ln"),
    "post_add": (_config(residual_before_ln="post_add"), _tensors(), "config.residual_before_ln"),
    "no residual": (_config(original_ln_after=False), _tensors(), "config.original_ln_after"),
    "activation": (_config(non_linearity="softplus"), _tensors(), "config.non_linearity"),
    "scaling": (_config(scaling="huge"), _tensors(), "config.scaling"),
    "hidden size": ({**_config(), "hidden_size": 32}, _tensors(), "hidden_size 32"),
    "too wide": (_config(), _tensors(width=16), "--max-bottleneck-width"),
    "shape": (_config(), _tensors(hidden=8), "shape mismatch"),
    "site off": (_config(), {k.replace("output_adapters", "attention_adapters"): v for k, v in _tensors().items()},
                 "config.mh_adapter is false"),
    "layer": (_config(), {k.replace("layers.0.", "layers.7."): v for k, v in _tensors().items()}, "layer 7"),
    "missing bias": (_config(), {k: v for k, v in _tensors().items() if not k.endswith("up.bias")},
                     "lacks adapter_up.bias"),
    "stray tensor": (_config(), _tensors(**{"lm_head.weight": torch.ones(64, 16)}), "unexpected tensor lm_head"),
    "learned without tensor": (_config(scaling="learned"), _tensors(), "config.scaling=learned"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_naming_the_field(case):
    config, tensors, needle = REFUSALS[case]
    with pytest.raises(AdapterFormatError) as e:
        bottleneck.parse(tensors, config, ARGS, max_width=8)
    assert needle in str(e.value)


def test_learned_and_channel_scaling_fold_into_up():
    w = bottleneck.parse(_tensors(**{P + "scaling": torch.tensor([2.0])}), _config(scaling="learned"), ARGS, 8)
    assert torch.equal(w.layers[(0, "mlp")].up_bias, torch.full((16,), 2.0))
    ch = torch.arange(16.0)
    w = bottleneck.parse(_tensors(**{P + "scaling": ch}), _config(scaling="channel"), ARGS, 8)
    assert torch.equal(w.layers[(0, "mlp")].up, ch[:, None].expand(16, 4))
