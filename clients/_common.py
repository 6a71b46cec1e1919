"""Pieces shared by the sync and async clients: request building, channel settings, retry policy."""

from __future__ import annotations

import ipaddress
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb

PathOrBytes = Union[str, "os.PathLike[str]", bytes, None]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Status codes on which idempotent calls are retried.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Methods safe to retry (read-only).
IDEMPOTENT = frozenset({"ListAdapters", "GetAdapter", "GetModelInfo", "Check"})
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),  # adapter uploads; the server enforces its own limit
    ("grpc.max_receive_message_length", -1),
]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# An adapter id, or a weighted mix of LoRA adapters ({id: weight} or [(id, weight)]); None = the base model.
AdapterChoice = Union[str, Mapping[str, float], Sequence[tuple[str, float]], None]


def parse_adapter(text: str | None) -> AdapterChoice:
    """The CLI's ``--adapter``: an id, or a mix ``a=0.5,b=-1`` (ids never hold '=' or ',')."""
    if not text:
        return None
    if "=" not in text:
        return text
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--adapter: {part!r} is not ID=WEIGHT") from None
    return mix

def backoff_delay(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, capped, jittered."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)


def _pem(value: PathOrBytes) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_credentials(tls: bool, tls_ca: PathOrBytes, tls_cert: PathOrBytes,
                        tls_key: PathOrBytes) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel.

    TLS is used when ``tls`` is true or any of ``tls_ca``/``tls_cert``/``tls_key`` is given;
    without ``tls_ca`` the system roots verify the server. ``tls_cert``+``tls_key`` is the
    client certificate for mutual TLS. Each is a PEM file path or PEM bytes.
    """
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key must be given together")
    if not (tls or tls_ca or tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert)
    )


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the bearer token when one is set."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def engine_metadata(engine_app: str | None, request: pb.GenerateRequest) -> tuple[tuple[str, str], ...]:
    """Routing metadata of a Generate/GenerateStream call to an adapterserve cluster's engine
    application (``python -m server.cluster``; docs/scale-out.md, "One hop fewer"): Serve's gRPC
    proxy then calls the engine replica holding the request's adapter (``multiplexed_model_id``: the
    adapter, or the first of a weighted mix) without the ingress hop. Nothing without `engine_app`."""
    if not engine_app:
        return ()
    adapter = routed_adapter(request)
    routing = (("application", engine_app),)
    # gRPC refuses a metadata value outside printable ASCII before sending anything (INTERNAL "Invalid
    # metadata"): such an id is routed as the base model's, and the replica refuses it by its own rules.
    if not adapter or not (adapter.isascii() and adapter.isprintable()):
        return routing
    return (*routing, ("multiplexed_model_id", adapter))


def routed_adapter(request: pb.GenerateRequest) -> str:
    """The adapter a cluster routes a request by: its adapter, or the first of a weighted mix ("" = base)."""
    return request.adapter_id or (request.adapters[0].adapter_id if len(request.adapters) else "")


def lease_request(request: pb.GenerateRequest) -> pb.LeaseRequest:
    """The RoutingService.Lease a lookaside client opens before sending `request` to the replica it names."""
    return pb.LeaseRequest(adapter_id=routed_adapter(request))


def _chat_message(m: Any) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    if isinstance(m, Mapping):
        return pb.ChatMessage(role=m["role"], content=m["content"])
    role, content = m
    return pb.ChatMessage(role=role, content=content)


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Iterable[Any] | None = None,
    token_ids: Sequence[int] | None = None,
    adapter: AdapterChoice = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    request_id: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; unset sampling fields take the server's defaults.

    Exactly one of ``prompt``, ``messages`` (dicts with role/content, or (role, content)
    pairs) and ``token_ids`` must be given. ``top_logprobs > 0`` implies ``logprobs``.
    """
    given = [name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages or token_ids (got {given or 'none'})")
    params = pb.SamplingParams(ignore_eos=ignore_eos)
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature),
                        ("top_k", top_k), ("top_p", top_p),
                        ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(params, name, value)
    if stop is not None:
        params.stop.extend([stop] if isinstance(stop, str) else list(stop))
    req = pb.GenerateRequest(
        adapter_id=adapter if isinstance(adapter, str) else "", params=params,
        return_logprobs=bool(logprobs or top_logprobs), top_logprobs=top_logprobs,
        request_id=request_id or "",
    )
    if adapter is not None and not isinstance(adapter, str):  # a weighted LoRA mix
        pairs = adapter.items() if isinstance(adapter, Mapping) else adapter
        req.adapters.extend(pb.AdapterWeight(adapter_id=a, weight=float(w)) for a, w in pairs)
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.messages.messages.extend(_chat_message(m) for m in messages)
    else:
        req.prompt_token_ids.ids.extend(int(t) for t in token_ids)
    return req


def read_adapter_dir(local_dir: str | os.PathLike[str]) -> pb.AdapterFiles:
    """The two files of a PEFT ``save_pretrained`` folder, ready for an inline upload."""
    folder = Path(local_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    config, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_CONFIG}")
    if not weights.is_file():
        hint = (" (only pickle weights found: save with safe_serialization=True)"
                if (folder / "adapter_model.bin").exists() else "")
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    config_bytes = config.read_bytes()
    try:
        json.loads(config_bytes)
    except ValueError as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from e
    return pb.AdapterFiles(config_json=config_bytes, safetensors=weights.read_bytes())


def build_register_request(adapter_id: str, path: str | None, local_dir: Any, merge: bool,
                           pin: bool, replace: bool) -> pb.RegisterAdapterRequest:
    """A RegisterAdapterRequest from a server-side ``path`` or an uploaded ``local_dir``."""
    if (path is None) == (local_dir is None):
        raise ValueError("give exactly one of path (on the server) or local_dir (uploaded)")
    req = pb.RegisterAdapterRequest(adapter_id=adapter_id, merge=merge, pin=pin, replace=replace)
    if path is not None:
        req.path = str(path)
    else:
        req.files.CopyFrom(read_adapter_dir(local_dir))
    return req


#: Metadata naming the lease of a lookaside generation (server.cluster.lease.LEASE_METADATA).
LEASE_METADATA = "adapterserve-lease"
#: How long closing a client waits for the cluster to end the leases of generations that finished.
LEASE_END_S = 1.0


def _host_of(target: str) -> str:
    """The host part of a gRPC target ("host:port", "[v6]:port", "dns:///host:port", "dns://8.8.8.8/host:port",
    "dns:host:port", "ipv4:host:port", "ipv6:[v6]:port")."""
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            if target.startswith("//"):  # dns://[authority]/host:port
                target = target[2:].split("/", 1)[-1]
            break
    if target.startswith("["):
        return target[1:target.find("]")]
    return target.rsplit(":", 1)[0] if ":" in target else target


def _is_loopback(host: str) -> bool:
    """(The client's copy of server.api.security's rule: the client package does not import the server.)"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def leased_replica(answer: pb.LeaseResponse | None, target: str) -> tuple[str, tuple[str, str]]:
    """(the replica's address, the metadata naming the lease) of a lease's first answer (None: the
    lease ended without one); raises UNAVAILABLE for no address, FAILED_PRECONDITION for one this
    client at `target` must not dial (:func:`replica_address_problem`)."""
    from clients.errors import FailedPreconditionError, UnavailableError

    address = answer.address if answer is not None else ""
    problem = replica_address_problem(address, target)
    if problem:
        raise (FailedPreconditionError if address else UnavailableError)(problem)
    return address, (LEASE_METADATA, answer.lease_id)


def replica_address_problem(address: str, target: str) -> str | None:
    """Why a lookaside client at `target` must not dial the replica `address` a lease named, or None:
    a loopback address (``--replica-host 127.0.0.1``, the default) names this client's own machine
    unless the cluster's own target is loopback too."""
    if not address:
        return "the cluster ended the lease without naming a replica"
    if _is_loopback(_host_of(address)) and not _is_loopback(_host_of(target)):
        return (f"the leased replica listens on {address}, a loopback address (the cluster's --replica-host): "
                f"this client reaches the cluster at {target}; start it with --replica-host 0.0.0.0")
    return None


#: Why lookaside refuses TLS settings: the replicas' own servers, like Serve's proxies, are plaintext.
LOOKASIDE_PLAINTEXT = ("lookaside: a cluster's replicas serve plaintext (as Ray Serve's proxies do), so the token "
                       "and prompts would leave TLS; use the proxy paths (engine_app, or none) with TLS")
