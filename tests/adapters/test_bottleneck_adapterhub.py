"""AdapterHub's own bottleneck files and layers (reference environment) against the kind module.

Pfeiffer (SeqBnConfig) and Houlsby (DoubleSeqBnConfig) adapters are made and saved by AdapterHub's
``save_adapter``; the server's parser reads them unchanged, and its per-row math reproduces
AdapterHub's layer output at every inserted place, rows of the base model in the same batch untouched.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from server.adapters.bottleneck_batch import BottleneckBatch, BottleneckSlots
from server.adapters.kinds import bottleneck
from server.model.config import ModelArgs
from tests.adapterhub import block_request, call_many, make_bottleneck_adapters, make_request

CASES = {
    "pfeiffer": ("SeqBnConfig", {"reduction_factor": 16}, ["mlp"], "relu", True),
    "houlsby": ("DoubleSeqBnConfig", {"reduction_factor": 8}, ["attn", "mlp"], "swish", False),
}


@pytest.fixture(scope="module")
def hub_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapterhub")
    make_bottleneck_adapters(*[make_request(tiny_llama, root / name, cls, seed=i, **cfg)
                               for i, (name, (cls, cfg, *_)) in enumerate(CASES.items())])
    return {name: root / name for name in CASES}


def _parse(folder, args: ModelArgs) -> bottleneck.BottleneckWeights:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert bottleneck.is_adapterhub_config(config)
    return bottleneck.parse(load_file(folder / "adapter.safetensors"), config, args, max_width=64)


@pytest.mark.parametrize("case", list(CASES))
def test_adapterhub_files_parse(case, hub_adapters, tiny_llama):
    args = ModelArgs.from_hf_config(json.loads((tiny_llama / "config.json").read_text()))
    _, cfg, sites, act, pfeiffer = CASES[case]
    w = _parse(hub_adapters[case], args)
    assert sorted(w.layers) == sorted((layer, s) for layer in range(args.num_layers) for s in sites)
    assert w.width == args.hidden_size // cfg["reduction_factor"]
    assert (w.non_linearity, w.add_residual_input) == (act, pfeiffer)


def test_rows_match_adapterhub_layers(hub_adapters, tiny_llama):
    """At every place of both adapters: AdapterHub's ``<site>_adapters(o, r)`` == r + o + delta of our rows."""
    args = ModelArgs.from_hf_config(json.loads((tiny_llama / "config.json").read_text()))
    weights = {name: _parse(hub_adapters[name], args) for name in CASES}
    slots = BottleneckSlots(args, num_slots=2, device="cpu", dtype=torch.float32)
    for slot, name in enumerate(CASES):
        slots.load(slot, weights[name])
    g = torch.Generator().manual_seed(0)
    row_slots = [0, -1, 1, 0]  # Pfeiffer, base, Houlsby, Pfeiffer
    places = [(layer, site) for layer in range(args.num_layers) for site in ("attn", "mlp")]
    inputs = {p: (torch.randn(4, 3, args.hidden_size, generator=g), torch.randn(4, 3, args.hidden_size, generator=g))
              for p in places}
    requests, keys = [], []
    for slot, name in enumerate(CASES):
        rows = [i for i, s in enumerate(row_slots) if s == slot]
        for layer, site in places:
            if (layer, site) in weights[name].layers:
                o, r = inputs[(layer, site)]
                requests.append(block_request(tiny_llama, hub_adapters[name], layer, site, o[rows].tolist(),
                                              r[rows].tolist()))
                keys.append((rows, layer, site))
    answers = call_many(requests)
    batch = BottleneckBatch(slots, row_slots)
    checked = set()
    for (rows, layer, site), answer in zip(keys, answers, strict=True):
        o, r = inputs[(layer, site)]
        out = o.clone()
        batch.apply(layer, site, r, out)
        want = torch.tensor(answer["out"])
        torch.testing.assert_close(r[rows] + out[rows], want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want, r[rows] + o[rows], atol=1e-2)  # the adapter visibly matters
        torch.testing.assert_close(out[1], o[1], atol=0, rtol=0)  # the base row is untouched
        checked.add((layer, site))
    assert checked == set(places)  # Houlsby covers attn, both cover mlp
