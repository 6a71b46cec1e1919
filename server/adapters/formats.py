"""Read PEFT adapters (``save_pretrained`` folders) into plain float32 tensors the engine can serve.

Accepted: ``adapter_config.json`` + ``adapter_model.safetensors`` for LORA (DoRA too), PROMPT_TUNING, P_TUNING,
PREFIX_TUNING, IA3 and LN_TUNING on the base model described by ``ModelArgs``, and AdapterHub's
``save_adapter`` folders (``adapter_config.json`` + ``adapter.safetensors``) of bottleneck adapters (the
newer kinds' formats live in server/adapters/kinds/). Pickle checkpoints are refused without being
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

import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from server.adapters.config_fields import (
    COMMON_FIELDS,
    LORA_FIELDS,
    PROMPT_FIELDS,
    check_fields,
    check_scale,
    is_int,
)
from server.adapters.errors import AdapterFormatError, AdapterPathError
from server.adapters.host_buffers import SPARE_BUFFERS
from server.adapters.kinds import bottleneck, dora, ia3, ln_tuning
from server.adapters.patterns import PatternTable, TargetModules, shown
from server.adapters.safetensors_file import MAX_HEADER_BYTES, WEIGHTS_NAME, name_shown, read_header
from server.model.config import LINEAR_MODULES, ModelArgs

__all__ = [
    "AdapterFormatError", "AdapterKind", "AdapterLimits", "AdapterPathError", "AdapterSpec", "LoraModule",
    "LoraWeights", "PrefixWeights", "PromptWeights", "load_adapter_dir", "load_adapter_files", "lora_scale",
    "max_adapter_file_bytes", "read_adapter_dir", "resolve_adapter_path", "validate_adapter_id",
]

CONFIG_NAME = "adapter_config.json"
ADAPTERHUB_WEIGHTS_NAME = "adapter.safetensors"  # AdapterHub's SAFE_WEIGHTS_NAME
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_PATH_CHARS = 1024  # a RegisterAdapter path; each component at most NAME_MAX (255 bytes)
# Every tensor value must be finite and at most float16's largest value in magnitude, so weights
# stay finite in any serving dtype (trained adapters hold values far below 1e3).
MAX_ABS_VALUE = 65504.0

_ADAPTER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
_LAYER_MODULE = re.compile(r"model\.layers\.(?P<layer>\d{1,6})\.(?:self_attn|mlp)\.(?P<name>\w+)")

# LoraConfig fields whose truthy value changes the forward pass (or the base weights) -> refused.
_LORA_UNSUPPORTED = {
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
    DORA = "DORA"  # peft_type LORA with use_dora
    IA3 = "IA3"
    LN_TUNING = "LN_TUNING"
    BOTTLENECK = "BOTTLENECK"  # AdapterHub's SeqBn / DoubleSeqBn (no peft_type: AdapterHub's own format)


# Kinds whose rows go through the batched LoRA slots (mixable: LORA only).
LORA_KINDS = (AdapterKind.LORA, AdapterKind.DORA)
PROMPT_KINDS = (AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING, AdapterKind.PREFIX_TUNING)


@dataclass
class AdapterLimits:
    """Upper bounds an adapter must respect to be registered."""

    max_lora_rank: int = 64
    max_virtual_tokens: int = 128
    max_bottleneck_width: int = 256


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
    weights: LoraWeights | PromptWeights | PrefixWeights | dora.DoraWeights | ia3.Ia3Weights | ln_tuning.LnTuningWeights
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

    Refuses empty, absolute, ``..`` and over-long paths, paths whose resolution leaves the root
    (e.g. a symlink pointing out of it) or loops, and paths that are not folders. Raises
    AdapterPathError; messages never show the server's own paths.
    """
    if not rel_path or "\x00" in rel_path:
        raise AdapterPathError("path must name a folder relative to the adapter root")
    if len(rel_path) > MAX_PATH_CHARS or any(len(p.encode()) > 255 for p in re.split(r"[/\\]", rel_path)):
        raise AdapterPathError(f"path is too long (at most {MAX_PATH_CHARS} characters, 255 bytes per component)")
    rel = Path(rel_path)
    if rel.is_absolute() or rel_path.startswith(("/", "\\")):
        raise AdapterPathError(f"path {shown(rel_path)} is absolute; give a path relative to the adapter root")
    if ".." in rel.parts or ".." in rel_path.split("\\"):
        raise AdapterPathError(f"path {shown(rel_path)} contains '..'")
    root_resolved = Path(root).resolve()
    if not root_resolved.is_dir():
        raise AdapterPathError("the server's adapter root is not a folder")
    try:
        target = (root_resolved / rel).resolve()
        is_dir = target.is_dir()
    except (OSError, RuntimeError) as e:  # RuntimeError: pathlib's symlink loop
        raise AdapterPathError(f"path {shown(rel_path)} cannot be resolved: {_os_reason(e)}") from None
    if not target.is_relative_to(root_resolved):
        raise AdapterPathError(f"path {shown(rel_path)} escapes the adapter root")
    if target == root_resolved:
        raise AdapterPathError(f"path {shown(rel_path)} must name a folder inside the adapter root")
    if not is_dir:
        raise AdapterPathError(f"path {shown(rel_path)} is not an adapter folder (missing or not a directory)")
    return target


def _os_reason(e: BaseException) -> str:
    """Why a path failed, without the path itself (it is the server's)."""
    if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
        return "a symlink loop"
    if getattr(e, "errno", None) == errno.ENAMETOOLONG:
        return "a name is too long"
    return getattr(e, "strerror", None) or type(e).__name__


# ---------------------------------------------------------------------------------------------- entry points


def load_adapter_dir(folder: str | Path, model: ModelArgs, limits: AdapterLimits,
                     root: str | Path | None = None) -> AdapterSpec:
    """Read a PEFT ``save_pretrained`` folder; pickle checkpoints are refused without being opened.

    With `root` (the server's ``--adapter-root``), each file must resolve inside it: a file that
    is a symlink leading out of the root is refused (AdapterPathError) before it is opened.
    """
    config_json, weights = read_adapter_dir(folder, model, limits, root)
    return load_adapter_files(config_json, weights, model, limits)


def read_adapter_dir(folder: str | Path, model: ModelArgs, limits: AdapterLimits,
                     root: str | Path | None = None) -> tuple[bytes, torch.Tensor]:
    """The bytes of a folder's two files (config, weights as a uint8 tensor), read with the same
    containment and size caps as :func:`load_adapter_dir`, not yet parsed (see :func:`load_adapter_files`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterPathError("adapter folder does not exist")
    root = None if root is None else Path(root).resolve()
    weights_path, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not _exists(weights_path) and _exists(folder / ADAPTERHUB_WEIGHTS_NAME):
        weights_path = folder / ADAPTERHUB_WEIGHTS_NAME  # AdapterHub's save_adapter(..., use_safetensors=True)
    if not _exists(weights_path):
        pickles = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterFormatError(
                f"adapter folder holds {pickles[0][:120]} but no {WEIGHTS_NAME}: safetensors only, "
                "pickle checkpoints are never opened (save with safe_serialization=True; AdapterHub: "
                f"save_adapter(..., use_safetensors=True) writes {ADAPTERHUB_WEIGHTS_NAME})"
            )
        raise AdapterFormatError(f"adapter folder has no {WEIGHTS_NAME}")
    if not _exists(config_path):
        raise AdapterFormatError(f"adapter folder has no {CONFIG_NAME}")
    config_json = _read_capped(config_path, root, MAX_CONFIG_BYTES, f"{CONFIG_NAME} is larger than 1 MiB")
    cap = max_adapter_file_bytes(model, limits)
    weights = _read_weights_file(weights_path, root, cap,
                                 f"{weights_path.name} is larger than any adapter within the limits "
                                 f"(max_lora_rank={limits.max_lora_rank}, "
                                 f"max_virtual_tokens={limits.max_virtual_tokens}, "
                                 f"max_bottleneck_width={limits.max_bottleneck_width}: {cap} bytes)")
    return config_json, weights


def load_adapter_files(
    config_json: bytes, safetensors_bytes: bytes | torch.Tensor, model: ModelArgs, limits: AdapterLimits
) -> AdapterSpec:
    """Parse and validate an adapter given as the bytes of its two files (the weights may come as a
    uint8 tensor already, as :func:`load_adapter_dir` reads them)."""
    config = _parse_config(config_json)
    kind = AdapterKind.BOTTLENECK if bottleneck.is_adapterhub_config(config) else _adapter_kind(config)
    if kind == AdapterKind.BOTTLENECK:
        bottleneck.check_config(config, model)
    elif kind in LORA_KINDS:
        _check_lora_config(config)
    elif kind == AdapterKind.IA3:
        ia3.check_config(config)
    elif kind == AdapterKind.LN_TUNING:
        ln_tuning.check_config(config)
    else:
        _check_prompt_config(config)
    cap = max_adapter_file_bytes(model, limits)
    if len(safetensors_bytes) > cap:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is larger than any adapter within the limits ({cap} bytes)")
    tensors = _read_tensors(safetensors_bytes)
    if kind in LORA_KINDS:
        magnitudes: dict[str, torch.Tensor] = {}
        if kind == AdapterKind.DORA:
            tensors, magnitudes = dora.split_magnitudes(tensors)
        weights = _lora_weights(tensors, config, model, limits)
        if kind == AdapterKind.DORA:
            weights = dora.parse(weights.modules, magnitudes, model)
        ranks = [m.a.shape[0] for m in weights.modules.values()]
        spec = AdapterSpec(kind, weights, rank=max(ranks),
                           target_modules=sorted({name for _, name in weights.modules}))
    elif kind == AdapterKind.IA3:
        weights = ia3.parse(tensors, config, model)
        spec = AdapterSpec(kind, weights, target_modules=sorted({name for _, name in weights.vectors}))
    elif kind == AdapterKind.LN_TUNING:
        weights = ln_tuning.parse(tensors, config, model)
        spec = AdapterSpec(kind, weights, target_modules=weights.target_modules)
    elif kind == AdapterKind.BOTTLENECK:
        weights = bottleneck.parse(tensors, config, model, limits.max_bottleneck_width)
        spec = AdapterSpec(kind, weights, rank=weights.width, target_modules=weights.target_modules)
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
    # LoRA / DoRA: A and B at the largest rank, plus DoRA's magnitude vector [out] per module.
    per_layer = sum(limits.max_lora_rank * sum(model.linear_shape(m)) + model.linear_shape(m)[0]
                    for m in LINEAR_MODULES)
    lora = model.num_layers * per_layer
    prompt = limits.max_virtual_tokens * model.hidden_size
    prefix = limits.max_virtual_tokens * model.num_layers * 2 * model.num_kv_heads * model.head_dim
    # Bottleneck: down, up and their biases at the widest width, after attention and the MLP, + scaling.
    width = limits.max_bottleneck_width
    bn = model.num_layers * 2 * (2 * width * model.hidden_size + width + 2 * model.hidden_size)
    return 8 * max(lora, prompt, prefix, bn) + MAX_HEADER_BYTES


# ---------------------------------------------------------------------------------------------- files


def _exists(path: Path) -> bool:
    """True for anything at `path`, a dangling or looping symlink included (it is refused on open)."""
    return os.path.lexists(path)


def _open_inside(path: Path, root: Path | None) -> int:
    """An fd for the regular file at `path`, whose resolution must stay inside `root` (if given)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: pathlib's symlink loop
        raise AdapterPathError(f"{path.name} cannot be opened: {_os_reason(e)}") from None
    if root is not None and not real.is_relative_to(root):
        raise AdapterPathError(f"{path.name} is a symlink leading outside the adapter root")
    try:  # O_NONBLOCK: a FIFO must not block the open; the fstat below refuses it
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AdapterPathError(f"{path.name} cannot be opened: {_os_reason(e)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterFormatError(f"{path.name} is not a regular file")
    return fd


def _read_capped(path: Path, root: Path | None, cap: int, too_big: str) -> bytes:
    fd = _open_inside(path, root)
    try:
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_size > cap:
                raise AdapterFormatError(too_big)
            data = f.read(cap + 1)
    except OSError as e:
        raise AdapterFormatError(f"cannot read {path.name}: {_os_reason(e)}") from None
    if len(data) > cap:
        raise AdapterFormatError(too_big)
    return data


def _parse_config(config_json: bytes) -> dict:
    if len(config_json) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{CONFIG_NAME} is larger than 1 MiB")
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as e:  # its message gives a position, never the document
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: not UTF-8") from None
    except (ValueError, RecursionError):  # nesting deeper than the parser's stack, 4300+ digit ints
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: nested too deeply or numbers too long") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must hold a JSON object, not {type(config).__name__}")
    check_fields(config, COMMON_FIELDS)
    return config


def _adapter_kind(config: dict) -> AdapterKind:
    peft_type = config.get("peft_type")
    if not peft_type:
        raise AdapterFormatError(f"{CONFIG_NAME} has no peft_type")
    not_peft = (AdapterKind.DORA, AdapterKind.BOTTLENECK)
    if peft_type not in AdapterKind.__members__ or peft_type in not_peft:
        raise AdapterFormatError(
            f"unsupported peft_type {peft_type[:40]}; supported: "
            f"{', '.join(k.value for k in AdapterKind if k not in not_peft)}"
        )
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterFormatError(f"unsupported task_type {task_type[:40]}; only CAUSAL_LM")
    if peft_type == "LORA" and config.get("use_dora"):
        return AdapterKind.DORA
    return AdapterKind(peft_type)


def _read_weights_file(path: Path, root: Path | None, cap: int, too_big: str) -> torch.Tensor:
    """The whole file as one uint8 tensor (its float32 tensors become views of it, see _read_tensors)."""
    fd = _open_inside(path, root)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > cap:
                raise AdapterFormatError(too_big)
            buf = SPARE_BUFFERS.take(size)
            got = f.readinto(memoryview(buf.numpy()))
            grew = bool(f.read(1))
    except OSError as e:
        raise AdapterFormatError(f"cannot read {path.name}: {_os_reason(e)}") from None
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
    """Check the safetensors framing strictly (no huge allocations), then build float32 tensors.

    Float32 tensors are views of one buffer holding the whole file: the file's bytes are touched
    once, not read into one allocation and then copied into 420 more. First touches of fresh memory
    are what registration waits on here (20 MB cost ~30 ms of page faults in the server process on
    the development VM); other dtypes are converted (a copy). Every value must be finite and at
    most MAX_ABS_VALUE in magnitude (see :func:`_check_values`).
    """
    buf = _as_buffer(data)
    raw = memoryview(buf.numpy())  # writable, so torch.frombuffer does not warn
    base, entries = read_header(raw)
    body = raw[base:]
    tensors = {}
    for e in entries:
        count = (e.end - e.start) // e.dtype.itemsize
        if e.dtype == torch.float32 and (base + e.start) % 4 == 0:
            tensors[e.name] = buf[base + e.start:base + e.end].view(torch.float32).view(e.shape)
            continue
        flat = (torch.frombuffer(body, dtype=e.dtype, count=count, offset=e.start) if count
                else torch.empty(0, dtype=e.dtype))
        tensors[e.name] = flat.view(e.shape).to(torch.float32, copy=True)
    all_f32 = base % 4 == 0 and all(e.dtype == torch.float32 for e in entries)
    _check_values(tensors, buf[base:] if all_f32 else None)
    return tensors


def _check_values(tensors: dict[str, torch.Tensor], f32_body: torch.Tensor | None) -> None:
    """Refuse NaN, inf and values beyond MAX_ABS_VALUE, naming the first offending tensor.

    ``f32_body`` (the data area as bytes, when every tensor is float32) is checked in one pass;
    the per-tensor walk runs only to name the culprit, or when dtypes are mixed.
    """
    if f32_body is not None and f32_body.numel():
        lo, hi = f32_body.view(torch.float32).aminmax()
        if -MAX_ABS_VALUE <= float(lo) and float(hi) <= MAX_ABS_VALUE:  # False for NaN
            return
    for name, t in tensors.items():
        if not t.numel():
            continue
        lo, hi = (float(v) for v in t.aminmax())
        if -MAX_ABS_VALUE <= lo and hi <= MAX_ABS_VALUE:
            continue
        if bool(t.isnan().any()):
            what = "NaN"
        elif not (math.isfinite(lo) and math.isfinite(hi)):
            what = "inf"
        else:
            what = f"a value of magnitude {max(abs(lo), abs(hi)):.3g}"
        raise AdapterFormatError(f"tensor {name_shown(name)} holds {what}; adapter weights must be finite "
                                 f"and at most {MAX_ABS_VALUE:g} in magnitude")


def _weights_nbytes(weights) -> int:
    if hasattr(weights, "nbytes"):  # the kinds in server/adapters/kinds/
        return weights.nbytes
    if isinstance(weights, LoraWeights):
        return sum(m.a.nbytes + m.b.nbytes for m in weights.modules.values())
    if isinstance(weights, PrefixWeights):
        return weights.keys.nbytes + weights.values.nbytes
    return weights.embeddings.nbytes


# ---------------------------------------------------------------------------------------------- LoRA


def _check_lora_config(config: dict) -> None:
    check_fields(config, LORA_FIELDS)
    for key, what in _LORA_UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFormatError(f"unsupported LoRA feature {key}={shown(config[key])} ({what})")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(f"unsupported LoRA feature bias={shown(bias)} (trained base biases)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterFormatError(
            f"unsupported LoRA feature init_lora_weights={shown(init)}: it rewrites the base weights; save the "
            "adapter with save_pretrained(path_initial_model_for_weight_conversion=...) to serve it on the "
            "original base"
        )
    target = config.get("target_modules")
    if isinstance(target, str):  # PEFT full-matches a string as a regex: it must at least compile
        TargetModules("target_modules", target)


class _LoraPatterns:
    """``rank_pattern`` and ``alpha_pattern`` of one config, compiled once, matched within a time budget."""

    def __init__(self, config: dict):
        self.config = config
        self.rank = PatternTable("rank_pattern", list(config.get("rank_pattern") or {}))
        self.alpha = PatternTable("alpha_pattern", list(config.get("alpha_pattern") or {}))

    def rank_of(self, module_path: str) -> int:
        key = self.rank.first(module_path)
        return self.config["rank_pattern"][key] if key is not None else self.config.get("r", 8)

    def scale_of(self, module_path: str, r: int) -> float:
        """PEFT's scaling: alpha / r (alpha / sqrt(r) with use_rslora), bounded by MAX_LORA_SCALE."""
        key = self.alpha.first(module_path)
        if key is not None:
            field, alpha = f"alpha_pattern[{shown(key)}]", self.config["alpha_pattern"][key]
        else:
            field, alpha = "lora_alpha", self.config.get("lora_alpha", 8)
        return check_scale(field, float(alpha), r, bool(self.config.get("use_rslora")), module_path)


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
    patterns = _LoraPatterns(config)
    for (layer, name), ab in sorted(pairs.items()):
        modules[(layer, name)] = _lora_module(layer, name, ab, patterns, model, limits)
    return LoraWeights(modules)


def _lora_key(key: str, model: ModelArgs) -> tuple[int, str, str]:
    """Map a tensor key to (layer, projection, "A" | "B"), refusing anything but decoder projections."""
    short = key[:160]
    if "lora_embedding_" in key:
        raise AdapterFormatError(f"unsupported LoRA target: embeddings ({short}); only {', '.join(LINEAR_MODULES)}")
    if "lora_magnitude_vector" in key:
        raise AdapterFormatError(f"tensor {short} is a DoRA magnitude but use_dora is not set in the config")
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
    layer: int, name: str, ab: dict[str, torch.Tensor], patterns: _LoraPatterns, model: ModelArgs,
    limits: AdapterLimits
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
    want_r = patterns.rank_of(path)
    if want_r != r:
        raise AdapterFormatError(f"{path}: config gives rank {want_r} (r / rank_pattern) but lora_A has rank {r}")
    return LoraModule(a=a, b=b, scale=patterns.scale_of(path, r))


def lora_scale(config: dict, module_path: str, r: int) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) with use_rslora); alpha from alpha_pattern or lora_alpha."""
    return _LoraPatterns(config).scale_of(module_path, r)


# ---------------------------------------------------------------------------------------------- prompt / prefix


def _check_prompt_config(config: dict) -> None:
    check_fields(config, PROMPT_FIELDS)
    subs = config.get("num_transformer_submodules", 1)
    if subs not in (None, 1):
        raise AdapterFormatError(f"unsupported num_transformer_submodules={shown(subs)} (decoder-only: 1)")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"unsupported feature modules_to_save={shown(config['modules_to_save'])}")


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
    if not (is_int(heads) and is_int(token_dim) and heads > 0 and token_dim % heads == 0):
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
