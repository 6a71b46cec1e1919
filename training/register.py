"""Register a finished adapter with a running adapterserve server (AdapterService.RegisterAdapter).

The two files are uploaded inline (``AdapterFiles``), so the server needs no access to this
machine's disk. Uses the generated stubs in ``proto/`` only, not the client package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from training.cli import UsageError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's save_pretrained
ADAPTERHUB_FILES = ("adapter_config.json", "adapter.safetensors")  # AdapterHub's save_adapter (bottleneck)
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_target(target: str, adapter_id: str) -> None:
    """Validate ``--register HOST:PORT`` and the adapter id before training starts."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--register {target!r}: expected HOST:PORT")
    if not _ID.match(adapter_id) or adapter_id in (".", ".."):
        raise UsageError(f"--adapter-id {adapter_id!r}: 1-128 characters of [A-Za-z0-9._-], not '.' or '..'")


def adapter_files(folder: str | Path) -> tuple[str, str]:
    """The two files of the adapter in `folder`: PEFT's, or AdapterHub's when only its weights file is there."""
    folder = Path(folder)
    if not (folder / ADAPTER_FILES[1]).is_file() and (folder / ADAPTERHUB_FILES[1]).is_file():
        return ADAPTERHUB_FILES
    return ADAPTER_FILES


def register_adapter(
    target: str,
    adapter_id: str,
    adapter_dir: str | Path,
    *,
    replace: bool = False,
    token: str | None = None,
    tls_ca: str | None = None,
    timeout: float = 120.0,
) -> Any:
    """Upload ``adapter_dir``'s two adapter files (PEFT's or AdapterHub's) as ``adapter_id``; return the
    server's ``Adapter``.

    ``token`` (default ``$ADAPTERSERVE_TOKEN``) is sent as ``authorization: Bearer <token>``;
    ``tls_ca`` switches to TLS with that CA bundle. gRPC errors propagate as ``grpc.RpcError``.
    """
    import grpc

    from adapterserve.v1 import adapterserve_pb2, adapterserve_pb2_grpc

    folder = Path(adapter_dir)
    config_json, safetensors = ((folder / name).read_bytes() for name in adapter_files(folder))
    size = len(config_json) + len(safetensors) + (1 << 20)
    options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", 16 << 20)]
    if tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    token = token or os.environ.get("ADAPTERSERVE_TOKEN") or None
    metadata = [("authorization", f"Bearer {token}")] if token else None
    request = adapterserve_pb2.RegisterAdapterRequest(
        adapter_id=adapter_id,
        files=adapterserve_pb2.AdapterFiles(config_json=config_json, safetensors=safetensors),
        replace=replace,
    )
    with channel:
        stub = adapterserve_pb2_grpc.AdapterServiceStub(channel)
        return stub.RegisterAdapter(request, timeout=timeout, metadata=metadata)
