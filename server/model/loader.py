"""Resolve ``--model`` (a folder or 'default') into a ready runtime and tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.config import ModelArgs, UnsupportedModelError
from server.model.llama import LlamaRuntime
from server.model.tokenizer import Tokenizer
from server.model.weights import load_weights, read_model_args

log = logging.getLogger("adapterserve.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    folder: Path
    args: ModelArgs
    runtime: LlamaRuntime
    tokenizer: Tokenizer
    dtype: str
    device: str


def resolve_model_folder(model: str, cache_dir: str | None = None) -> tuple[str, Path]:
    """'default' -> the converted embedded model; otherwise a local HF folder (never a hub id)."""
    if model == "default":
        from server.model.default_model import DEFAULT_MODEL_NAME, ensure_default_model

        return DEFAULT_MODEL_NAME, ensure_default_model(cache_dir or None)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise UnsupportedModelError(f"--model {model!r} is not a local folder (nothing is downloaded from a hub)")
    return str(folder), folder


def load_model(model: str, device: str = "cpu", dtype: str = "float32", cache_dir: str | None = None,
               matmul: str = "onednn", kernels: str = "auto", cuda_graphs: str = "on") -> LoadedModel:
    """Load config, weights and tokenizer; raise UnsupportedModelError with a clear reason."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda requested but torch sees no CUDA device")
    t0 = time.perf_counter()
    name, folder = resolve_model_folder(model, cache_dir)
    args = read_model_args(folder)
    weights = load_weights(folder, args, DTYPES[dtype], device)
    runtime = LlamaRuntime(args, weights, device, DTYPES[dtype], matmul=matmul, kernels=kernels,
                           cuda_graphs=cuda_graphs)
    tokenizer = Tokenizer.from_folder(folder, args)
    log.info("loaded %s (%s, %d layers) on %s/%s in %.2fs", name, args.architecture, args.num_layers,
             device, dtype, time.perf_counter() - t0)
    return LoadedModel(name, folder, args, runtime, tokenizer, dtype, device)
