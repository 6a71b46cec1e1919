"""Load a Llama-family HF folder (config.json + safetensors, sharded or not) into fused tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from server.model.config import ModelArgs, UnsupportedModelError


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused so each is one matmul."""

    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [q + 2*kv, hidden]
    bqkv: torch.Tensor | None  # [q + 2*kv]
    wo: torch.Tensor  # [hidden, q]
    bo: torch.Tensor | None  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2*inter, hidden]
    w_down: torch.Tensor  # [hidden, inter]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden] (the embedding itself when tied)


def read_model_args(folder: Path) -> ModelArgs:
    """Parse ``config.json`` of an HF model folder."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UnsupportedModelError(f"{folder} has no config.json; --model needs an HF-format folder or 'default'")
    return ModelArgs.from_hf_config(json.loads(cfg_path.read_text()))


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{folder} holds no *.safetensors weights (pickle checkpoints are not loaded)")
    return files


def load_weights(folder: Path, args: ModelArgs, dtype: torch.dtype, device: str) -> ModelWeights:
    """Read every tensor once, fuse per layer, cast to `dtype` and move to `device`."""
    raw: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    return fuse_weights(raw, args, dtype, device, str(folder))


def fuse_weights(raw: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype, device: str,
                 source: str = "state dict") -> ModelWeights:
    """Fuse an HF state dict {name: tensor} per layer (consumes `raw`); unfused tensors already of
    `dtype` on `device` are used as they are (bench/gpu_check shares them with a transformers model)."""
    folder = source

    def take(name: str, required: bool = True) -> torch.Tensor | None:
        t = raw.pop(name, None)
        if t is None and required:
            raise UnsupportedModelError(f"weight {name!r} missing from {folder}")
        return None if t is None else t.to(device=device, dtype=dtype)

    layers = []
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (take(p + f"self_attn.{m}_proj.weight") for m in "qkv")
        bias = [take(p + f"self_attn.{m}_proj.bias", required=args.qkv_bias) for m in "qkv"]
        layers.append(
            LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"),
                wqkv=torch.cat([q, k, v], 0).contiguous(),
                bqkv=torch.cat(bias, 0).contiguous() if args.qkv_bias else None,
                wo=take(p + "self_attn.o_proj.weight"),
                bo=take(p + "self_attn.o_proj.bias", required=args.o_bias),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0).contiguous(),
                w_down=take(p + "mlp.down_proj.weight"),
            )
        )
    embed = take("model.embed_tokens.weight")
    lm_head = take("lm_head.weight", required=not args.tie_word_embeddings)
    if args.tie_word_embeddings or lm_head is None:
        lm_head = embed
    weights = ModelWeights(embed=embed, layers=layers, norm=take("model.norm.weight"), lm_head=lm_head)
    leftover = [k for k in raw if "rotary_emb" not in k]
    if leftover:
        raise UnsupportedModelError(f"unexpected weights (unsupported variant?): {leftover[:5]}")
    return weights
