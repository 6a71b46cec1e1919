"""Read PEFT adapters (``save_pretrained`` folders) into plain float32 tensors the engine can serve.

Accepted: ``adapter_config.json`` + ``adapter_model.safetensors`` for LORA, PROMPT_TUNING, P_TUNING and
PREFIX_TUNING on the base model described by ``ModelArgs``. Pickle checkpoints are refused without being
opened. Anything that would change the math beyond what the engine computes (DoRA, trained biases,
``modules_to_save``, LoRA on embeddings, ...) is refused with a message naming the feature.

Facts checked against peft 0.21 (see tests/adapters/test_formats.py):

- LoRA keys are ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r],
  without the adapter name; rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` (first key with
  ``re.match(rf"(.*\\.)?({key})$", module path)``), else ``r`` / ``lora_alpha``; scaling is alpha / r, or
  alpha / sqrt(r) with ``use_rslora``.
- Prompt tuning and P-tuning save ``prompt_embeddings`` [n, hidden]; for P-tuning that is the output of the
  reparameterisation encoder (MLP / LSTM), so serving needs no encoder.
- Prefix tuning saves ``prompt_embeddings`` [n, L * 2 * H_kv * D] (also with ``prefix_projection``, whose MLP
  output is what is saved); PEFT rewrites ``token_dim`` = H_kv * D and ``num_attention_heads`` = H_kv for GQA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from server.adapters.errors import AdapterFormatError, AdapterPathError
from server.adapters.host_buffers import SPARE_BUFFERS
from server.model.config import LINEAR_MODULES, ModelArgs

__all__ = [
    "AdapterFormatError", "AdapterKind", "AdapterLimits", "AdapterPathError", "AdapterSpec", "LoraModule",
    "LoraWeights", "PrefixWeights", "PromptWeights", "load_adapter_dir", "load_adapter_files", "lora_scale",
    "max_adapter_file_bytes", "resolve_adapter_path", "validate_adapter_id",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 8 << 20  # safetensors JSON header; also the slack on top of the tensor bytes

_ADAPTER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
_LAYER_MODULE = re.compile(r"model\.layers\.(?P<layer>\d{1,6})\.(?:self_attn|mlp)\.(?P<name>\w+)")

# LoraConfig fields whose truthy value changes the forward pass (or the base weights) -> refused.
_LORA_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "fully trained extra modules",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA input pooling",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated decoder layers",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "use_bdlora": "the block-diagonal LoRA variant",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
}
# init_lora_weights values that rewrite the base weights (the adapter needs the residual base).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterKind(str, Enum):
    """The PEFT methods this server serves (values are PEFT's ``peft_type`` names)."""

    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


@dataclass
class AdapterLimits:
    """Upper bounds an adapter must respect to be registered."""

    max_lora_rank: int = 64
    max_virtual_tokens: int = 128


@dataclass
class LoraModule:
    """One adapted projection: y = x W^T + scale * (x A^T) B^T."""

    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32
    scale: float


@dataclass
class LoraWeights:
    modules: dict[tuple[int, str], LoraModule]  # (layer index, "q_proj", ...) -> weights


@dataclass
class PromptWeights:
    embeddings: torch.Tensor  # [n_virtual, hidden] (prompt tuning and P-tuning)


@dataclass
class PrefixWeights:
    keys: torch.Tensor  # [num_layers, num_kv_heads, n_virtual, head_dim], raw (no rotary)
    values: torch.Tensor  # [num_layers, num_kv_heads, n_virtual, head_dim]


@dataclass
class AdapterSpec:
    """A parsed, validated adapter: its weights plus the metadata the API reports."""

    kind: AdapterKind
    weights: LoraWeights | PromptWeights | PrefixWeights
    rank: int = 0  # largest LoRA rank; 0 for the prompt kinds
    num_virtual_tokens: int = 0  # 0 for LoRA
    target_modules: list[str] = field(default_factory=list)  # sorted, e.g. ["q_proj", "v_proj"]
    size_bytes: int = 0  # sum of tensor nbytes
    base_model: str = ""  # base_model_name_or_path from the config
    config: dict = field(default_factory=dict)  # the raw adapter_config.json


# ---------------------------------------------------------------------------------------------- ids and paths


def validate_adapter_id(adapter_id: str) -> None:
    """Accept 1-128 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``; else raise AdapterFormatError."""
    if not isinstance(adapter_id, str) or not _ADAPTER_ID.fullmatch(adapter_id) or adapter_id in (".", ".."):
        shown = repr(adapter_id)[:40]
        raise AdapterFormatError(
            f"adapter_id {shown} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ - (not '.' or '..')"
        )


def resolve_adapter_path(root: str | Path, rel_path: str) -> Path:
    """Resolve `rel_path` under `root` (following symlinks) to an existing folder inside `root`.

    Refuses empty, absolute and ``..`` paths, paths whose resolution leaves the root (e.g. a symlink
    pointing out of it), and paths that are not folders. Raises AdapterPathError.
    """
    if not rel_path or "\x00" in rel_path:
        raise AdapterPathError("path must name a folder relative to the adapter root")
    rel = Path(rel_path)
    if rel.is_absolute() or rel_path.startswith(("/", "\\")):
        raise AdapterPathError(f"path {rel_path!r} is absolute; give a path relative to the adapter root")
    if ".." in rel.parts or ".." in rel_path.split("\\"):
        raise AdapterPathError(f"path {rel_path!r} contains '..'")
    root_resolved = Path(root).resolve()
    if not root_resolved.is_dir():
        raise AdapterPathError("the server's adapter root is not a folder")
    target = (root_resolved / rel).resolve()
    if not target.is_relative_to(root_resolved):
        raise AdapterPathError(f"path {rel_path!r} escapes the adapter root")
    if target == root_resolved:
        raise AdapterPathError(f"path {rel_path!r} must name a folder inside the adapter root")
    if not target.is_dir():
        raise AdapterPathError(f"path {rel_path!r} is not an adapter folder (missing or not a directory)")
    return target


# ---------------------------------------------------------------------------------------------- entry points


def load_adapter_dir(folder: str | Path, model: ModelArgs, limits: AdapterLimits) -> AdapterSpec:
    """Read a PEFT ``save_pretrained`` folder; pickle checkpoints are refused without being opened."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterPathError("adapter folder does not exist")
    weights_path, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterFormatError(
                f"adapter folder holds {pickles[0]} but no {WEIGHTS_NAME}: safetensors only, "
                "pickle checkpoints are never opened (save with safe_serialization=True)"
            )
        raise AdapterFormatError(f"adapter folder has no {WEIGHTS_NAME}")
    if not config_path.is_file():
        raise AdapterFormatError(f"adapter folder has no {CONFIG_NAME}")
    config_json = _read_capped(config_path, MAX_CONFIG_BYTES, f"{CONFIG_NAME} is larger than 1 MiB")
    cap = max_adapter_file_bytes(model, limits)
    weights = _read_weights_file(weights_path, cap, f"{WEIGHTS_NAME} is larger than any adapter within the limits "
                                                    f"(max_lora_rank={limits.max_lora_rank}, "
                                                    f"max_virtual_tokens={limits.max_virtual_tokens}: {cap} bytes)")
    return load_adapter_files(config_json, weights, model, limits)


def load_adapter_files(
    config_json: bytes, safetensors_bytes: bytes | torch.Tensor, model: ModelArgs, limits: AdapterLimits
) -> AdapterSpec:
    """Parse and validate an adapter given as the bytes of its two files (the weights may come as a
    uint8 tensor already, as :func:`load_adapter_dir` reads them)."""
    config = _parse_config(config_json)
    kind = _adapter_kind(config)
    if kind == AdapterKind.LORA:
        _check_lora_config(config)
    else:
        _check_prompt_config(config)
    cap = max_adapter_file_bytes(model, limits)
    if len(safetensors_bytes) > cap:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is larger than any adapter within the limits ({cap} bytes)")
    tensors = _read_tensors(safetensors_bytes)
    if kind == AdapterKind.LORA:
        weights = _lora_weights(tensors, config, model, limits)
        ranks = [m.a.shape[0] for m in weights.modules.values()]
        spec = AdapterSpec(kind, weights, rank=max(ranks),
                           target_modules=sorted({name for _, name in weights.modules}))
    elif kind == AdapterKind.PREFIX_TUNING:
        weights = _prefix_weights(tensors, config, model, limits)
        spec = AdapterSpec(kind, weights, num_virtual_tokens=weights.keys.shape[2])
    else:
        weights = _prompt_weights(tensors, config, model, limits)
        spec = AdapterSpec(kind, weights, num_virtual_tokens=weights.embeddings.shape[0])
    spec.size_bytes = _weights_nbytes(weights)
    spec.base_model = str(config.get("base_model_name_or_path") or "")
    spec.config = config
    return spec


def max_adapter_file_bytes(model: ModelArgs, limits: AdapterLimits) -> int:
    """Largest safetensors file a valid adapter within `limits` can be (float64 tensors + header)."""
    per_layer = sum(limits.max_lora_rank * sum(model.linear_shape(m)) for m in LINEAR_MODULES)
    lora = model.num_layers * per_layer
    prompt = limits.max_virtual_tokens * model.hidden_size
    prefix = limits.max_virtual_tokens * model.num_layers * 2 * model.num_kv_heads * model.head_dim
    return 8 * max(lora, prompt, prefix) + MAX_HEADER_BYTES


# ---------------------------------------------------------------------------------------------- files


def _read_capped(path: Path, cap: int, too_big: str) -> bytes:
    try:
        if path.stat().st_size > cap:
            raise AdapterFormatError(too_big)
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise AdapterFormatError(f"cannot read {path.name}: {e.strerror}") from None
    if len(data) > cap:
        raise AdapterFormatError(too_big)
    return data


def _parse_config(config_json: bytes) -> dict:
    if len(config_json) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{CONFIG_NAME} is larger than 1 MiB")
    try:
        config = json.loads(config_json)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must hold a JSON object, not {type(config).__name__}")
    return config


def _adapter_kind(config: dict) -> AdapterKind:
    peft_type = config.get("peft_type")
    if not peft_type:
        raise AdapterFormatError(f"{CONFIG_NAME} has no peft_type")
    if peft_type not in AdapterKind.__members__:
        raise AdapterFormatError(
            f"unsupported peft_type {str(peft_type)[:40]}; supported: {', '.join(k.value for k in AdapterKind)}"
        )
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterFormatError(f"unsupported task_type {str(task_type)[:40]}; only CAUSAL_LM")
    return AdapterKind(peft_type)


def _read_weights_file(path: Path, cap: int, too_big: str) -> torch.Tensor:
    """The whole file as one uint8 tensor (its float32 tensors become views of it, see _read_tensors)."""
    try:
        size = path.stat().st_size
        if size > cap:
            raise AdapterFormatError(too_big)
        buf = SPARE_BUFFERS.take(size)
        with path.open("rb") as f:
            got = f.readinto(memoryview(buf.numpy()))
            grew = bool(f.read(1))
    except OSError as e:
        raise AdapterFormatError(f"cannot read {path.name}: {e.strerror}") from None
    if got != size or grew:
        raise AdapterFormatError(f"{path.name} changed while it was being read")
    return buf


def _as_buffer(data: bytes | torch.Tensor) -> torch.Tensor:
    """One uint8 tensor holding the bytes (a single copy for bytes from a gRPC message)."""
    if isinstance(data, torch.Tensor):
        return data
    buf = SPARE_BUFFERS.take(len(data))
    buf.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return buf


def _read_tensors(data: bytes | torch.Tensor) -> dict[str, torch.Tensor]:
    """Check the safetensors framing ourselves (no huge allocations), then parse; float32, contiguous.

    Float32 tensors are views of one buffer holding the whole file: the file's bytes are touched
    once, not read into one allocation and then copied into 420 more. First touches of fresh memory
    are what registration waits on here (20 MB cost ~30 ms of page faults in the server process on
    the development VM); other dtypes are converted (a copy).
    """
    buf = _as_buffer(data)
    raw = memoryview(buf.numpy())  # writable, so torch.frombuffer does not warn
    _check_safetensors_header(raw)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(bytes(raw[8:8 + n]))
    base = 8 + n
    body = raw[base:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
        except (TypeError, KeyError, ValueError):
            raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: bad entry for {str(name)[:120]}") from None
        if dtype is None and info.get("dtype") in _SAFETENSORS_OTHER_DTYPES:
            shown = _SAFETENSORS_OTHER_DTYPES[info["dtype"]]
            raise AdapterFormatError(f"tensor {str(name)[:120]} has dtype {shown}; adapters hold floating point")
        if dtype is None:
            raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: unknown dtype {str(info.get('dtype'))[:20]}")
        if not (0 <= start <= end <= len(body)) or end - start != count * dtype.itemsize:
            raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: {str(name)[:120]} does not fit its bytes")
        if dtype == torch.float32 and (base + start) % 4 == 0:
            tensors[name] = buf[base + start:base + end].view(torch.float32).view(*shape)
            continue
        flat = torch.frombuffer(body, dtype=dtype, count=count, offset=start) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(*shape).to(torch.float32, copy=True)
    return tensors


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_SAFETENSORS_OTHER_DTYPES = {"I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
                             "U8": "torch.uint8", "BOOL": "torch.bool"}


def _check_safetensors_header(data: memoryview) -> None:
    """8-byte little-endian header length, a JSON header, then exactly the bytes the header describes."""
    if len(data) < 8:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is truncated or corrupt: header length {n} "
                                 f"but the file has {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8:8 + n]))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise AdapterFormatError(f"{WEIGHTS_NAME} is corrupt: unreadable header") from None
    body = len(data) - 8 - n
    if max(ends, default=0) != body:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is truncated or corrupt: the header describes "
                                 f"{max(ends, default=0)} bytes of tensor data, the file holds {body}")


def _weights_nbytes(weights: LoraWeights | PromptWeights | PrefixWeights) -> int:
    if isinstance(weights, LoraWeights):
        return sum(m.a.nbytes + m.b.nbytes for m in weights.modules.values())
    if isinstance(weights, PrefixWeights):
        return weights.keys.nbytes + weights.values.nbytes
    return weights.embeddings.nbytes


# ---------------------------------------------------------------------------------------------- LoRA


def _check_lora_config(config: dict) -> None:
    for key, what in _LORA_UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFormatError(f"unsupported LoRA feature {key}={config[key]!r} ({what})")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(f"unsupported LoRA feature bias={bias!r} (trained base biases)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterFormatError(
            f"unsupported LoRA feature init_lora_weights={init!r}: it rewrites the base weights; save the adapter "
            "with save_pretrained(path_initial_model_for_weight_conversion=...) to serve it on the original base"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(_is_number(v) for v in pattern.values()):
            raise AdapterFormatError(f"{key} must map module patterns to numbers")


def _lora_weights(
    tensors: dict[str, torch.Tensor], config: dict, model: ModelArgs, limits: AdapterLimits
) -> LoraWeights:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, name, ab = _lora_key(key, model)
        pairs.setdefault((layer, name), {})[ab] = t
    if not pairs:
        raise AdapterFormatError("LoRA adapter matches no modules (no lora_A / lora_B tensors)")
    modules = {}
    for (layer, name), ab in sorted(pairs.items()):
        modules[(layer, name)] = _lora_module(layer, name, ab, config, model, limits)
    return LoraWeights(modules)


def _lora_key(key: str, model: ModelArgs) -> tuple[int, str, str]:
    """Map a tensor key to (layer, projection, "A" | "B"), refusing anything but decoder projections."""
    short = key[:160]
    if "lora_embedding_" in key:
        raise AdapterFormatError(f"unsupported LoRA target: embeddings ({short}); only {', '.join(LINEAR_MODULES)}")
    if "lora_magnitude_vector" in key:
        raise AdapterFormatError(f"unsupported LoRA feature use_dora (tensor {short})")
    m = _LORA_KEY.fullmatch(key)
    if not m:
        raise AdapterFormatError(f"unexpected tensor {short} in a LoRA adapter")
    module = m["module"]
    lm = _LAYER_MODULE.fullmatch(module)
    if not lm or lm["name"] not in LINEAR_MODULES or model.module_path(int(lm["layer"]), lm["name"]) != module:
        target = module.rsplit(".", 1)[-1][:60]
        raise AdapterFormatError(
            f"unsupported LoRA target {target} ({module[:120]}); only {', '.join(LINEAR_MODULES)} in decoder layers"
        )
    layer = int(lm["layer"])
    if layer >= model.num_layers:
        raise AdapterFormatError(f"LoRA targets layer {layer} but the base model has {model.num_layers} layers")
    return layer, lm["name"], m["ab"]


def _lora_module(
    layer: int, name: str, ab: dict[str, torch.Tensor], config: dict, model: ModelArgs, limits: AdapterLimits
) -> LoraModule:
    path = model.module_path(layer, name)
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise AdapterFormatError(f"{path} has no {missing} tensor")
    a, b = ab["A"], ab["B"]  # [r, in], [out, r]
    out_f, in_f = model.linear_shape(name)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterFormatError(
            f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r]"
        )
    if a.shape[1] != in_f or b.shape[0] != out_f:
        raise AdapterFormatError(
            f"shape mismatch at {path}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} "
            f"but the base projection is [out={out_f}, in={in_f}]"
        )
    r = a.shape[0]
    if r == 0:
        raise AdapterFormatError(f"{path} has rank 0")
    if r > limits.max_lora_rank:
        raise AdapterFormatError(f"rank {r} of {path} exceeds max_lora_rank {limits.max_lora_rank}")
    want_r = _pattern_value(config, "rank_pattern", path, config.get("r", 8))
    if want_r != r:
        raise AdapterFormatError(f"{path}: config gives rank {want_r} (r / rank_pattern) but lora_A has rank {r}")
    return LoraModule(a=a, b=b, scale=lora_scale(config, path, r))


def lora_scale(config: dict, module_path: str, r: int) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) with use_rslora); alpha from alpha_pattern or lora_alpha."""
    alpha = float(_pattern_value(config, "alpha_pattern", module_path, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_value(config: dict, key: str, module_path: str, default):
    """PEFT's get_pattern_key: the first pattern key with re.match(rf"(.*\\.)?({key})$", module_path)."""
    for pattern, value in (config.get(key) or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                return value
        except re.error as e:
            raise AdapterFormatError(f"{key} has an invalid pattern {pattern[:60]!r}: {e}") from None
    return default


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------- prompt / prefix


def _check_prompt_config(config: dict) -> None:
    subs = config.get("num_transformer_submodules", 1)
    if subs not in (None, 1):
        raise AdapterFormatError(f"unsupported num_transformer_submodules={subs!r} (decoder-only: 1)")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"unsupported feature modules_to_save={config['modules_to_save']!r}")


def _prompt_tensor(tensors: dict[str, torch.Tensor], config: dict, limits: AdapterLimits) -> torch.Tensor:
    """The single ``prompt_embeddings`` [n, width] tensor, with n checked against config and limits."""
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise AdapterFormatError(f"unexpected tensor {extra[0][:120]} in a {config['peft_type']} adapter")
    if "prompt_embeddings" not in tensors:
        raise AdapterFormatError(f"{config['peft_type']} adapter has no prompt_embeddings tensor")
    emb = tensors["prompt_embeddings"]
    if emb.dim() != 2:
        raise AdapterFormatError(f"prompt_embeddings must be 2-D, got {tuple(emb.shape)}")
    n = emb.shape[0]
    want = config.get("num_virtual_tokens", n)
    if want != n:
        raise AdapterFormatError(f"num_virtual_tokens is {want} but prompt_embeddings has {n} rows")
    if n == 0:
        raise AdapterFormatError("num_virtual_tokens is 0")
    if n > limits.max_virtual_tokens:
        raise AdapterFormatError(f"num_virtual_tokens {n} exceeds max_virtual_tokens {limits.max_virtual_tokens}")
    return emb


def _prompt_weights(
    tensors: dict[str, torch.Tensor], config: dict, model: ModelArgs, limits: AdapterLimits
) -> PromptWeights:
    emb = _prompt_tensor(tensors, config, limits)  # [n, hidden]
    if emb.shape[1] != model.hidden_size:
        raise AdapterFormatError(
            f"shape mismatch: prompt_embeddings width {emb.shape[1]} but the base hidden_size is {model.hidden_size}"
        )
    return PromptWeights(embeddings=emb)


def _prefix_weights(
    tensors: dict[str, torch.Tensor], config: dict, model: ModelArgs, limits: AdapterLimits
) -> PrefixWeights:
    emb = _prompt_tensor(tensors, config, limits)  # [n, L * 2 * H_kv * D]
    n, L = emb.shape[0], model.num_layers
    layers = config.get("num_layers", L)
    if layers != L:
        raise AdapterFormatError(f"prefix num_layers is {layers} but the base model has {L} layers")
    heads = config.get("num_attention_heads", model.num_kv_heads)
    token_dim = config.get("token_dim", model.num_kv_heads * model.head_dim)
    if not (_is_int(heads) and _is_int(token_dim) and heads > 0 and token_dim % heads == 0):
        raise AdapterFormatError(f"prefix token_dim {token_dim!r} is not a multiple of num_attention_heads {heads!r}")
    head_dim = token_dim // heads
    if (heads, head_dim) != (model.num_kv_heads, model.head_dim):
        raise AdapterFormatError(
            f"shape mismatch: prefix has {heads} KV heads x head_dim {head_dim} (num_attention_heads, token_dim) "
            f"but the base model has {model.num_kv_heads} x {model.head_dim}"
        )
    if emb.shape[1] != L * 2 * token_dim:
        raise AdapterFormatError(
            f"shape mismatch: prompt_embeddings width {emb.shape[1]}, expected num_layers*2*token_dim = "
            f"{L * 2 * token_dim}"
        )
    kv = emb.view(n, L * 2, heads, head_dim).permute(1, 2, 0, 3)  # [2L, H_kv, n, D]; row 2l = K, 2l+1 = V
    return PrefixWeights(keys=kv[0::2].contiguous(), values=kv[1::2].contiguous())  # [L, H_kv, n, D] each
