"""AdapterHub (the ``adapters`` library) as the reference for bottleneck adapters.

This file runs INSIDE the reference environment (``.venv-ref``: transformers 4.57, adapters 1.3, the same
CPU torch; built by ``make ref-env``), never in the project's own: tests call it through
:mod:`tests.adapterhub` as ``.venv-ref/bin/python tests/bottleneck_reference.py`` with one JSON request
on stdin and get one JSON answer on stdout. Commands:

- ``make``: build a SeqBn (Pfeiffer) / DoubleSeqBn (Houlsby) / any BnConfig adapter on a base folder,
  give every adapter parameter random non-trivial values (AdapterHub initialises the up-projection to
  zero), and save it with AdapterHub's own ``save_adapter`` (safetensors).
- ``greedy``: load a base folder, optionally one saved adapter (``load_adapter`` + ``set_active_adapters``),
  and decode greedily with full forward passes (no KV cache), returning tokens and their logprobs.
- ``logits``: the last-position log-softmax of each prompt (for "equal logits" checks).
- ``block``: one bottleneck layer of a loaded adapter applied alone to given tensors.
"""

from __future__ import annotations

import json
import os
import sys

# tests/ holds a package named `adapters` (the project's adapter tests): never let it shadow AdapterHub's.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

CONFIG_CLASSES = ("SeqBnConfig", "DoubleSeqBnConfig", "BnConfig", "ParBnConfig", "SeqBnInvConfig")


def _model(base_dir: str):
    import adapters
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with open(os.path.join(base_dir, "config.json")) as f:  # transformers 5 writes rope_theta inside
        rope = json.load(f).get("rope_parameters") or {}  # rope_parameters, which 4.57 does not read
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, config=config, dtype=torch.float32)
    adapters.init(model)
    return model


def make(req: dict) -> dict:
    import adapters

    torch.manual_seed(int(req.get("seed", 0)))
    model = _model(req["base_dir"])
    cls = req.get("config_class", "SeqBnConfig")
    if cls not in CONFIG_CLASSES:
        raise ValueError(f"config_class {cls!r}")
    config = getattr(adapters, cls)(**req.get("config", {}))
    name = req.get("name", "bn")
    model.add_adapter(name, config=config)
    std = float(req.get("std", 0.3))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".{name}." in pname:
                p.normal_(0.0, std)
    model.save_adapter(req["out_dir"], name, use_safetensors=True)
    return {"params": sorted(n for n, _ in model.named_parameters() if f".{name}." in n)}


def _load(req: dict):
    model = _model(req["base_dir"])
    if req.get("adapter_dir"):
        name = model.load_adapter(req["adapter_dir"], use_safetensors=True)
        model.set_active_adapters(name)
    return model.eval()


@torch.no_grad()
def greedy(req: dict) -> dict:
    model = _load(req)
    out = []
    for prompt in req["prompts"]:
        ids = list(prompt)
        tokens, logprobs = [], []
        for _ in range(int(req["max_new_tokens"])):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # [vocab]
            lp = torch.log_softmax(logits.float(), dim=-1)
            tok = int(torch.argmax(lp))
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
        out.append({"tokens": tokens, "logprobs": logprobs})
    return {"results": out}


@torch.no_grad()
def logits(req: dict) -> dict:
    model = _load(req)
    return {"logprobs": [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1).tolist()
                         for p in req["prompts"]]}


@torch.no_grad()
def block(req: dict) -> dict:
    """AdapterHub's bottleneck layer at one place alone: ``<site>_adapters(o, r, None)`` of decoder layer
    ``layer`` for given sub-layer outputs o and residual streams r ([B, S, H] nested lists)."""
    model = _load(req)
    layer = model.model.layers[int(req["layer"])]
    mod = layer.attention_adapters if req["site"] == "attn" else layer.output_adapters
    o, r = torch.tensor(req["o"]), torch.tensor(req["r"])
    return {"out": mod(o, r, None).tolist()}


COMMANDS = {"make": make, "greedy": greedy, "logits": logits, "block": block}


def run(req: dict):
    """One command, or a list of them (``{"batch": [...]}``) in this one process (imports cost seconds)."""
    if "batch" in req:
        return [run(r) for r in req["batch"]]
    return COMMANDS[req["command"]](req)


def main() -> None:
    json.dump(run(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
