"""One typed server configuration, built from command-line flags and ADAPTERSERVE_* variables.

Every field of :class:`ServerConfig` is one flag (``--kv-cache-tokens``) and one environment
variable (``ADAPTERSERVE_KV_CACHE_TOKENS``); a flag given on the command line wins over the
environment, which wins over the default. Values are validated once, in :func:`parse_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "ADAPTERSERVE_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


def _opt(default: Any, help: str, group: str, **kw: Any) -> Any:
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServerConfig:
    """All server settings. Field name ``foo_bar`` = flag ``--foo-bar`` = env ``ADAPTERSERVE_FOO_BAR``."""

    # -- model
    model: str = _opt("default", "Base model: 'default' (embedded SmolLM2-135M-Instruct) or a local HF folder.", "model")
    device: str = _opt("cpu", "Compute device.", "model", choices=["cpu", "cuda"])
    dtype: str = _opt("float32", "Weights and activations dtype.", "model", choices=["float32", "bfloat16", "float16"])
    cache_dir: str = _opt("", "Where the default model is converted once (default: ~/.cache/adapterserve).", "model")
    threads: int = _opt(0, "torch CPU threads (0 = number of cores).", "model")
    matmul: str = _opt("onednn", "CPU matrix kernel: onednn (about 1.5x faster decoding; fp32 logits within ~2e-4 of "
                       "transformers) or blas (transformers' own kernel: identical logits).", "model",
                       choices=["onednn", "blas"])
    kernels: str = _opt("auto", "Kernels of the forward pass and the sampler: auto (fused Triton kernels on CUDA when triton is "
                        "installed, torch on CPU), triton (always; CPU runs Triton's interpreter, for tests), torch.",
                        "model", choices=["auto", "triton", "torch"])
    cuda_graphs: str = _opt("on", "Replay decode steps from CUDA graphs, one per batch-size bucket (CUDA with the "
                            "Triton kernels only).", "model", choices=["on", "off"])
    # -- network
    host: str = _opt("127.0.0.1", "gRPC listen address.", "network")
    port: int = _opt(50051, "gRPC listen port (0 = pick a free port).", "network")
    http_port: int = _opt(8000, "OpenAI-compatible HTTP API port (0 disables).", "network")
    http_host: str = _opt("127.0.0.1", "OpenAI-compatible HTTP API listen address.", "network")
    metrics_port: int = _opt(9464, "Prometheus /metrics port (0 disables).", "network")
    metrics_host: str = _opt("127.0.0.1", "Prometheus /metrics listen address.", "network")
    max_message_bytes: int = _opt(64 * 1024 * 1024, "Largest gRPC message or HTTP body accepted (adapter uploads).",
                                  "network")
    drain_seconds: float = _opt(3.0, "On SIGTERM, how long health reports NOT_SERVING while new requests are still "
                                "accepted (so load balancers stop routing here) before they get UNAVAILABLE.", "network")
    grace_seconds: float = _opt(30.0, "On SIGTERM, how long in-flight requests may take to finish after --drain-seconds; "
                                "those still running then are answered UNAVAILABLE.", "network")
    # -- engine
    kv_cache_tokens: int = _opt(32768, "KV cache budget in tokens, shared by all running sequences.", "engine")
    kv_page_tokens: int = _opt(16, "Tokens per KV cache page.", "engine")
    max_batch_size: int = _opt(32, "Most sequences in one decode step.", "engine")
    max_queue: int = _opt(256, "Most requests waiting for admission; beyond it RESOURCE_EXHAUSTED.", "engine")
    max_context: int = _opt(0, "Longest prompt + completion in tokens (0 = the model's own limit).", "engine")
    default_max_new_tokens: int = _opt(256, "max_new_tokens when a request leaves it unset.", "engine")
    max_prefill_tokens: int = _opt(512, "Most prompt tokens computed in one step: longer prompts are prefilled in "
                                   "chunks, one batch of chunks per step between decode steps.", "engine")
    prefix_cache: str = _opt("on", "Reuse the KV pages of earlier prompts with the same leading tokens and adapter.",
                             "engine", choices=["on", "off"])
    kv_allocation: str = _opt("on-demand", "on-demand: KV pages as sequences grow, preempting the newest request "
                              "when they run out; reserve: prompt + max_new_tokens at admission (no preemption).",
                              "engine", choices=["on-demand", "reserve"])
    watchdog_seconds: float = _opt(60.0, "An engine step running longer than this marks the engine failed: health "
                                   "NOT_SERVING, waiting and new requests UNAVAILABLE (0 = no limit; a dead engine "
                                   "thread is always detected).", "engine")
    # -- adapters
    adapter_root: str = _opt(".", "Folder that RegisterAdapter paths are resolved under, and the adapter store "
                             "(one folder per adapter id) that --lazy-adapters loads from.", "adapters")
    lazy_adapters: bool = _opt(False, "A request naming an adapter id that is not registered registers "
                               "<adapter-root>/<id> on first use (as RegisterAdapter would; NOT_FOUND when there is "
                               "no such folder).", "adapters", action=argparse.BooleanOptionalAction)
    preload: list[str] = _opt([], "ID=PATH adapter to register at start (repeatable).", "adapters", action="append")
    max_resident_adapters: int = _opt(16, "Most LoRA adapters in compute-device slots at once.", "adapters")
    adapter_memory_bytes: int = _opt(2 * 1024**3, "Device memory budget for resident adapter weights.", "adapters")
    max_lora_rank: int = _opt(64, "Largest LoRA rank accepted at registration.", "adapters")
    max_virtual_tokens: int = _opt(128, "Most virtual tokens accepted for prompt/prefix adapters.", "adapters")
    max_bottleneck_width: int = _opt(256, "Widest bottleneck adapter layer (hidden_size / reduction_factor) "
                                     "accepted at registration.", "adapters")
    max_adapters_per_request: int = _opt(4, "Most LoRA adapters one request may mix (GenerateRequest.adapters).",
                                         "adapters")
    lora_threads: int = _opt(1, "CPU threads for the small LoRA matmuls of decode steps (0 = --threads); "
                             "1 measured fastest on 2 cores shared with the gRPC threads.", "adapters")
    # -- observability
    metrics_max_adapter_labels: int = _opt(100, "Distinct adapter label values before '_other'.", "observability")
    log_format: str = _opt("text", "Log line format.", "observability", choices=["text", "json"])
    log_level: str = _opt("INFO", "Log level.", "observability", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # -- security
    auth_token: str = _opt("", "Bearer token every RPC but health requires.", "security")
    auth_token_file: str = _opt("", "File holding the bearer token.", "security")
    admin_token: str = _opt("", "Bearer token AdapterService's mutating RPCs additionally require.", "security")
    admin_token_file: str = _opt("", "File holding the admin token.", "security")
    tls_cert: str = _opt("", "PEM server certificate (enables TLS).", "security")
    tls_key: str = _opt("", "PEM server private key.", "security")
    tls_client_ca: str = _opt("", "PEM CA bundle; when set clients must present a certificate (mutual TLS).", "security")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid flag."""
        positive = ["kv_cache_tokens", "kv_page_tokens", "max_batch_size", "max_queue",
                    "default_max_new_tokens", "max_prefill_tokens", "max_resident_adapters",
                    "max_lora_rank", "max_virtual_tokens", "max_bottleneck_width", "max_adapters_per_request", "metrics_max_adapter_labels", "max_message_bytes"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ["port", "metrics_port", "http_port"]:
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"--{_flag(name)} must be in 0..65535, got {getattr(self, name)}")
        for name in ["max_context", "threads", "lora_threads", "grace_seconds", "drain_seconds", "watchdog_seconds"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        for item in self.preload:
            if "=" not in item:
                raise ConfigError(f"--preload expects ID=PATH, got {item!r}")

    def resolved_auth_token(self) -> str:
        return _read_secret(self.auth_token, self.auth_token_file, "auth-token")

    def resolved_admin_token(self) -> str:
        return _read_secret(self.admin_token, self.admin_token_file, "admin-token")


def _read_secret(value: str, path: str, flag: str) -> str:
    if value and path:
        raise ConfigError(f"give --{flag} or --{flag}-file, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise ConfigError(f"--{flag}-file: cannot read {path}: {e}") from e
    return value


def _flag(name: str) -> str:
    return name.replace("_", "-")


_DESCRIPTION = ("adapterserve: one frozen base model, many LoRA / prompt / P-tuning / prefix adapters, served over "
                "gRPC with continuous batching. Every flag can also be set as ADAPTERSERVE_<FLAG>.")


def build_parser(cls: type = ServerConfig, prog: str = "python -m server",
                 description: str = _DESCRIPTION) -> argparse.ArgumentParser:
    """The argument parser of a config dataclass (``python -m server``'s by default; server.cluster
    passes its subclass); every flag documents its env variable."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        group_name = meta.pop("group")
        group = groups.get(group_name) or parser.add_argument_group(group_name)
        groups[group_name] = group
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{meta.pop('help')} [env {env}]"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name, **meta}
        if "action" not in kwargs:
            kwargs["type"] = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)
    return parser


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None, cls: type = ServerConfig,
                 prog: str = "python -m server") -> Any:
    """Flags > ADAPTERSERVE_* environment > defaults; validated. Raises ConfigError or SystemExit.
    Returns a ``cls`` (ServerConfig or a subclass with more fields)."""
    env = dict(os.environ if env is None else env)
    args = vars(build_parser(cls, prog).parse_args(argv))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in args:
            values[f.name] = args[f.name]
            continue
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        values[f.name] = _from_env(f, raw)
    cfg = cls(**values)
    cfg.validate()
    return cfg


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False,
          "": False}


def _from_env(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type)
    if kind == "bool":
        value = raw.strip().lower()
        if value not in _BOOLS:
            raise ConfigError(f"{ENV_PREFIX}{f.name.upper()} must be one of {sorted(_BOOLS)}, got {raw!r}")
        return _BOOLS[value]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as e:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: not a number: {raw!r}") from e
    if kind.startswith("list"):
        return [item for item in raw.replace(",", " ").split() if item]
    choices = f.metadata.get("choices")
    if choices and raw not in choices:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()} must be one of {choices}, got {raw!r}")
    return raw
