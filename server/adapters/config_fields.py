"""Types and bounds of the ``adapter_config.json`` fields this server reads.

A config is client input: every field the server reads is checked here before use, so a list where
a string belongs, a string where a number belongs, NaN / inf / 1e308 or a negative rank is refused
with AdapterFormatError naming the field (INVALID_ARGUMENT) instead of failing later as INTERNAL.
Fields the server does not read are ignored, whatever they hold. Values are never echoed beyond a
short repr, so a config's bytes do not travel back in error messages.

Bounds (documented in docs/reliability.md):

- ``lora_alpha`` and ``alpha_pattern`` values: finite, and the resulting LoRA scaling
  (alpha / r, or alpha / sqrt(r) with ``use_rslora``) at most :data:`MAX_LORA_SCALE` in magnitude.
  PEFT's defaults give 1-2 and published adapters stay well below 100.
- ``r`` and ``rank_pattern`` values: integers >= 1 (the tensors' shapes must then agree).

Thread: any (registration runs on a worker thread).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from server.adapters.errors import AdapterFormatError
from server.adapters.patterns import shown

MAX_LORA_SCALE = 1000.0
CONFIG_NAME = "adapter_config.json"

Check = Callable[[object], bool]


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float (not a bool; JSON's NaN / Infinity and ints beyond float range refused)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _positive_int(v: object) -> bool:
    return is_int(v) and v >= 1


def _opt(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _str(v: object) -> bool:
    return isinstance(v, str)


def _bool(v: object) -> bool:
    return isinstance(v, bool)


def _str_or_str_list(v: object) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


def _int_or_int_list(v: object) -> bool:
    return is_int(v) or (isinstance(v, list) and all(is_int(i) for i in v))


def _mapping(values: Check) -> Check:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and k and values(x) for k, x in v.items())


# field -> (check, what the field must be); applied only when the field is present.
COMMON_FIELDS: dict[str, tuple[Check, str]] = {
    "peft_type": (_opt(_str), "a string"),
    "task_type": (_opt(_str), "a string or null"),
    "base_model_name_or_path": (_opt(_str), "a string or null"),
    "num_transformer_submodules": (_opt(is_int), "an integer or null"),
}
LORA_FIELDS: dict[str, tuple[Check, str]] = {
    "r": (_positive_int, "an integer >= 1"),
    "lora_alpha": (is_number, "a finite number"),
    "use_rslora": (_opt(_bool), "true or false"),
    "rank_pattern": (_opt(_mapping(_positive_int)), "an object mapping module patterns to integers >= 1"),
    "alpha_pattern": (_opt(_mapping(is_number)), "an object mapping module patterns to finite numbers"),
    "target_modules": (_opt(_str_or_str_list), "a string, a list of strings or null"),
    "layers_to_transform": (_opt(_int_or_int_list), "an integer, a list of integers or null"),
    "layers_pattern": (_opt(_str_or_str_list), "a string, a list of strings or null"),
    "bias": (_opt(_str), "a string"),
    "init_lora_weights": (_opt(lambda v: isinstance(v, (bool, str))), "true, false or a string"),
}
PROMPT_FIELDS: dict[str, tuple[Check, str]] = {
    "num_virtual_tokens": (_positive_int, "an integer >= 1"),
    "num_layers": (_opt(_positive_int), "an integer >= 1"),
    "num_attention_heads": (_opt(_positive_int), "an integer >= 1"),
    "token_dim": (_opt(_positive_int), "an integer >= 1"),
}


def check_fields(config: dict, fields: dict[str, tuple[Check, str]]) -> None:
    """Raise AdapterFormatError for the first present field whose value has the wrong type or range."""
    for name, (check, what) in fields.items():
        if name in config and not check(config[name]):
            raise AdapterFormatError(f"{CONFIG_NAME}: {name} must be {what}, got {_kind(config[name])}")


def check_scale(field: str, alpha: float, r: int, rslora: bool, module_path: str) -> float:
    """PEFT's scaling for one module, refused when it is not finite or larger than MAX_LORA_SCALE."""
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise AdapterFormatError(
            f"{field}: gives {module_path} a scaling of {scale:g} (alpha {alpha:g}, rank {r}); "
            f"|scaling| must be at most {MAX_LORA_SCALE:g}")
    return scale


def _kind(v: object) -> str:
    """What a JSON value is, for messages: its type, and the value itself only for short scalars."""
    if isinstance(v, bool) or v is None or (isinstance(v, (int, float)) and len(repr(v)) <= 24):
        return shown(v)
    return {dict: "an object", list: "a list", str: "a string"}.get(type(v), "a number")
